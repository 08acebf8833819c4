"""Run N cooperating processes on this machine, as on N hosts: CPU devices, gloo.

  python launch/local.py --processes 2 --devices-per-process 2 -- \
      sora-train --config configs/demo.py --workdir runs/multi

Each process gets XLA_FLAGS for its CPU devices and the flags
--config.distributed.{coordinator,num_processes,process_id}; output lines are prefixed
with the process id. If a process fails, the others are given --grace seconds to notice
(JAX's heartbeat stops them) and are then terminated. The exit code is the first
failure's, or 0.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_commands(command: list[str], processes: int, port: int) -> list[list[str]]:
    flags = [
        f"--config.distributed.coordinator=127.0.0.1:{port}",
        f"--config.distributed.num_processes={processes}",
    ]
    return [[*command, *flags, f"--config.distributed.process_id={i}"] for i in range(processes)]


def process_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--grace", type=float, default=60.0)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    port = args.port or free_port()
    env = process_env(args.devices_per_process)
    procs = []
    for i, cmd in enumerate(process_commands(command, args.processes, port)):
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        threading.Thread(target=_relay, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True).start()
        procs.append(p)
    failure, deadline = 0, None
    while any(p.poll() is None for p in procs):
        for p in procs:
            if p.returncode not in (None, 0) and not failure:
                failure, deadline = p.returncode, time.time() + args.grace
        if deadline and time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    return failure or next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
