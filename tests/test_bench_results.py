"""Every figure in BENCHMARKS.md traces to a committed script and its JSON: `make bench`
runs each script in bench/ with its results file, each file is in bench/results/, and
each holds the fields the documents quote from it and the machine it was measured on.
These read files only: a script added without its results, or a results file without the
figure a table quotes, fails here before anyone reads a number with no source."""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NOT_SCRIPTS = {"__init__.py", "common.py"}

# What BENCHMARKS.md and the README quote from each file. "a.b" is nested; "a[].b" is b
# in every element of the list a; "a{}.b" is b in every value of the dict a.
QUOTED = {
    "train_step.json": [
        "step_ms", "clips_per_s", "flops_per_step", "achieved_flops_per_s",
        "peak_matmul_flops_per_s", "mfu",
    ],
    "peers.json": [
        "hosts{}.results[].framework", "hosts{}.results[].step_ms",
        "hosts{}.results[].flax_speedup",
    ],
    "peers_bf16.json": [
        "hosts{}.results[].framework", "hosts{}.results[].step_ms",
        "hosts{}.results[].flax_speedup",
    ],
    "peers_baseline.json": ["results[].framework", "results[].step_ms"],
    "conv_layers.json": ["layers", "totals"],
    "conv_layers_bf16.json": ["layers", "totals"],
    "input_pipeline.json": [
        "prepared_clips_per_s_per_core", "raw_pyav_clips_per_s_per_core",
        "data_wait_fraction", "train_clips_per_s",
    ],
    "compile_time.json": ["audio_frames_s", "video_frames_s", "audio_max_over_min"],
    "memory.json": ["no_remat", "remat"],
    "pretrain.json": ["similarity", "train_step"],
    "storage.json": ["checkpoint_demo", "data_reads"],
    "av_sync.json": ["runs"],
    "ann.json": [
        "results[].library", "results[].build_s", "results[].search_all_s",
        "results[].recall_at_10", "results[].index_mib",
    ],
    "curate.json": [
        "results[].flags.av_mismatch.precision", "results[].flags.av_mismatch.recall",
        "results[].flags.av_mismatch.at_threshold", "bootstrap_folds",
        "results[].runs.faulty.retrieval_r1", "results[].runs.curated.retrieval_r1",
        "results[].runs.faulty.probe_top1", "results[].runs.curated.probe_top1",
        "results[].curate_throughput",
    ],
    "seeds.json": ["demo_top1", "pretrain_v2a_r1", "probe_top1", "control_top1"],
    "seeds_demo.json": ["demo_top1", "demo_audio_only_top1", "demo_video_only_top1"],
    "seeds_demo_no_conv_bias.json": [
        "demo_overrides", "demo_top1", "demo_audio_only_top1", "demo_video_only_top1",
    ],
    "seeds_demo_wide.json": [
        "demo_preset", "demo_top1", "demo_audio_only_top1", "demo_video_only_top1",
    ],
    "timeline.json": ["ffmpeg_decode_fps", "realistic"],
    "kill_drill.json": ["kills", "same_losses", "checkpoints_intact", "orphan_processes", "ok"],
    "tpu_compile.json": [
        "runs{}.command", "runs{}.bytes_per_device.total", "runs{}.flops_per_step",
        "runs{}.hbm_bytes_per_step", "runs{}.flops_per_byte", "runs{}.step_time_bound_s",
        "runs{}.expected_step_time_s", "runs{}.expected_mfu", "runs{}.estimated_cycles_by_part",
        "runs{}.compile_s", "runs{}.machine.date",
    ],
    "tpu_branch.json": [
        "runs{}.clips_per_chip", "runs{}.flops_per_byte", "runs{}.hbm_bytes",
        "runs{}.expected_s", "runs{}.expected_mfu", "runs{}.loops", "runs{}.layers",
        "runs{}.machine.date",
    ],
}  # fmt: skip

# The scripts whose runs add to their results file: a TPU compile takes minutes to hours;
# the peers keep one run per host kind (the kernels that run depend on the CPU).
ADDED_TO = {"tpu_compile.json": "runs", "tpu_branch.json": "runs"}
ADDED_TO |= {"peers.json": "hosts", "peers_bf16.json": "hosts"}


def _bench_recipe() -> str:
    """The commands of the Makefile's bench and drill targets."""
    makefile = (ROOT / "Makefile").read_text()
    recipes = re.findall(r"^(?:bench|drill):.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert len(recipes) == 2, "the Makefile has no bench or drill target"
    return "".join(recipes)


def _values(tree, path: str) -> list:
    """Every value at `path` in `tree` (see QUOTED); KeyError naming what is missing."""
    nodes = [tree]
    for part in path.split("."):
        key, kind = part.rstrip("[]{}"), part[len(part.rstrip("[]{}")) :]
        found = []
        for node in nodes:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{path}: no {key!r}")
            value = node[key]
            if kind == "[]":
                found.extend(value)
            elif kind == "{}":
                found.extend(value.values())
            else:
                found.append(value)
        if not found:
            raise KeyError(f"{path}: {key!r} is empty")
        nodes = found
    return nodes


def test_make_bench_runs_every_script_in_bench_into_a_results_file_that_exists():
    recipe = _bench_recipe()
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in NOT_SCRIPTS)
    ran = dict.fromkeys(re.findall(r"bench/(\w+\.py)", recipe))
    assert not set(scripts) - set(ran), f"make bench does not run {set(scripts) - set(ran)}"
    written = re.findall(r"--out bench/results/(\w+\.json)", recipe)
    missing = [name for name in written if not (RESULTS / name).is_file()]
    assert not missing, f"make bench writes these, but bench/results/ has none: {missing}"
    # peers_baseline.json is the peers before this project's speed work: kept, never rerun.
    stray = {p.name for p in RESULTS.glob("*.json")} - set(written) - {"peers_baseline.json"}
    assert not stray, f"results no script in make bench writes: {stray}"


def test_every_results_file_the_documents_name_exists_and_is_declared_here():
    benchmarks = set(re.findall(r"\b(\w+\.json)\b", (ROOT / "BENCHMARKS.md").read_text()))
    assert not benchmarks - set(QUOTED), f"BENCHMARKS.md names {benchmarks - set(QUOTED)}"
    readme = set(re.findall(r"\b(\w+\.json)\b", (ROOT / "README.md").read_text()))
    assert not {n for n in readme if (RESULTS / n).exists()} - set(QUOTED)
    assert set(QUOTED) == {p.name for p in RESULTS.glob("*.json")}


@pytest.mark.parametrize("name", sorted(QUOTED))
def test_each_results_file_holds_the_fields_quoted_and_its_machine(name):
    result = json.loads((RESULTS / name).read_text())
    for path in QUOTED[name]:
        assert all(v is not None for v in _values(result, path)), f"{name}: {path} is null"
    machines = [result.get("machine", result)]  # older scripts put its fields at the top
    if name in ADDED_TO:  # each run was its own invocation, on its own machine and date
        machines = [run.get("machine", run) for run in result[ADDED_TO[name]].values()]
    for machine in machines:
        assert {"cpu", "date", "jax"} <= set(machine), f"{name} does not say where it was measured"


def test_a_missing_field_is_named():
    """The check above can fail, and says what is missing."""
    with pytest.raises(KeyError, match=r"results\[\]\.step_ms: no 'step_ms'"):
        _values({"results": [{"step_ms": 1}, {"framework": "x"}]}, "results[].step_ms")
    with pytest.raises(KeyError, match="'runs' is empty"):
        _values({"runs": {}}, "runs{}.command")
