"""sora-export and sora-predict: exact equality with the trained model and with sora-eval,
and an artifact that runs without sora_jax."""

import importlib.metadata
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from packaging.requirements import Requirement

from sora_jax import config as config_lib
from sora_jax import storage
from sora_jax.export import export as export_lib
from sora_jax.export.predict import Predictor
from sora_jax.inputs import InputSpec
from sora_jax.train import setup
from sora_jax.train.evaluate import Evaluator
from sora_jax.workdir import Workdir
from tests.conftest import built_once, compiled, run_compiled, small_disk

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(short_run, tmp_path_factory):
    """(work dir, export dir, model card) of the shared `sora-train` run's export."""
    workdir = short_run / "run"
    build = lambda root: export_lib.export(workdir, root / "export")
    output = built_once(tmp_path_factory, "exported", build) / "export"
    return workdir, output, json.loads((output / "model_card.json").read_text())


def _random_inputs(config, batch, seed):
    inputs = InputSpec.from_config(config).random(batch, np.random.default_rng(seed))
    inputs["has_video"][2:3] = False  # one clip without video, one without audio
    inputs["has_audio"][1:2] = False
    return inputs


def test_exported_function_equals_the_model_at_two_batch_sizes(exported):
    workdir, output, card = exported
    assert set(card["platforms"]) == {"cpu", "cuda", "tpu"}
    config = config_lib.load(workdir)
    restored = setup.load_for_inference(config, workdir)
    model, params = restored.setup.model, restored.params
    artifact = jax.export.deserialize((output / "model.jax").read_bytes())
    from orbax.checkpoint import StandardCheckpointer

    exported_params = StandardCheckpointer().restore(output / "params")
    apply = lambda p, x: model.apply({"params": p}, x, modality_embeddings=True)
    calls = {}  # batch size -> the artifact's symbolic program compiled for it
    for batch in (3, 7):
        inputs = _random_inputs(config, batch, batch)
        calls[batch] = compiled(artifact.call, exported_params, inputs)
        got = calls[batch](exported_params, inputs)
        want = run_compiled(apply, params, inputs)
        assert set(got) == set(export_lib.exported_outputs(config))
        for key in ("logits", "embedding", "video_embedding", "audio_embedding"):
            rel = np.linalg.norm(np.asarray(got[key]) - np.asarray(want[key])) / np.linalg.norm(
                np.asarray(want[key])
            )
            assert rel < 1e-5, (batch, key, rel)
        # The demo's gated fusion: its weights on each sense, over the senses present.
        gates = np.asarray(got["fusion_gates"])  # [B, 2]; row 1 has no audio, row 2 no video
        np.testing.assert_allclose(gates.sum(1), 1.0, rtol=1e-6)
        assert gates[1, 1] == 0 and gates[2, 0] == 0 and (gates[0] > 0).all()
    float_artifact = jax.export.deserialize((output / "model_float.jax").read_bytes())
    inputs = _random_inputs(config, 3, 0)
    as_float = dict(inputs, audio=inputs["audio"].astype(np.float32) / 32768.0)
    np.testing.assert_allclose(
        run_compiled(float_artifact.call, exported_params, as_float)["logits"],
        calls[3](exported_params, inputs)["logits"],
        rtol=1e-5,
        atol=1e-6,
    )
    assert "| full |" in (output / "model_card.md").read_text()


def test_sora_predict_agrees_with_sora_eval_on_a_demo_clip(exported, demo_data):
    workdir, output, _ = exported
    config = config_lib.load(workdir)
    restored = setup.load_for_inference(config, workdir)
    evaluator = Evaluator(restored.setup, config, "test", restored.dataset.class_names)
    scores, _ = evaluator.scores(restored.params)
    evaluator.close()
    source = tfds.data_source(config.data.name, split="test", data_dir=config.data.dir)
    raw_root = pathlib.Path(demo_data[0]).parent / "raw"
    predictor = Predictor(output)
    for index in (0, 7):
        key = source[index]["path"].decode()
        probs, embedding, has_audio = predictor.scores(raw_root / key)
        np.testing.assert_allclose(probs, scores["full"][index], atol=1e-4)
        assert np.argmax(probs) == np.argmax(scores["full"][index])
        assert has_audio and embedding.shape == (16,)


# Run by the client tests in place of `python`: the modules of every distribution that
# the export's requirements.txt would not install cannot be imported, as in a fresh
# virtual environment; the modules the run imported are reported.
AS_A_CLIENT = """
import json, runpy, sys

blocked, report, sys.argv = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in json.load(open(blocked)):
    sys.modules[name] = None  # an import fails; importlib.util.find_spec says None
before = set(sys.modules)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(report, "w") as f:
        json.dump(sorted({m.partition(".")[0] for m in set(sys.modules) - before}), f)
"""
PROJECT_MODULES = ("sora_jax", "data_prep", "configs", "tests")  # an editable install


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions(requirements: list[str]) -> set[str]:
    """The distributions `pip install -r` of these requirements installs: them and their
    dependencies (with the extras asked for), as installed here."""
    found, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name, extras = _canonical(req.name), {"", *req.extras}
        if (name, frozenset(extras)) in found:
            continue
        found.add((name, frozenset(extras)))
        for spec in importlib.metadata.requires(name) or []:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return {name for name, _ in found}


def _run_as_a_client(export: pathlib.Path, script: pathlib.Path, *args: str, cwd: pathlib.Path):
    """(completed process, top-level modules it imported) of `python script args` from
    `cwd`, able to import only the standard library and what the export's
    requirements.txt installs: sora_jax, flax, optax, tensorflow and the rest of this
    environment are out of reach."""
    requirements = [
        line
        for line in (export / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    installed = _distributions(requirements)
    blocked = [
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not {_canonical(d) for d in dists} & installed and module not in sys.stdlib_module_names
    ]
    assert {"flax", "optax", "tensorflow"} <= set(blocked)
    (cwd / "_blocked.json").write_text(json.dumps([*blocked, *PROJECT_MODULES]))
    (cwd / "_as_a_client.py").write_text(AS_A_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "_as_a_client.py", "_blocked.json", "_imported.json", str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )
    report = cwd / "_imported.json"
    return done, json.loads(report.read_text()) if report.exists() else []


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_client_scores_files_as_sora_predict_and_needs_only_its_requirements(
    exported, demo_data, tmp_path
):
    _, output, card = exported
    from tests.media import write_clip

    clip = pathlib.Path(demo_data[0]).parent / "raw" / "test" / "red_high" / "red_high_000.mp4"
    silent = write_clip(tmp_path / "silent.mp4", seconds=2.0, fps=8, audio=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01" * 500)
    short = write_clip(tmp_path / "short.mp4", seconds=0.25, fps=8)  # the window is 0.875 s
    files = [str(clip), str(silent), str(broken), str(short)]
    # The client, as a downstream team runs it: with only what requirements.txt installs.
    done, imported = _run_as_a_client(output, output / "client.py", *files, cwd=tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]
    client = [json.loads(line) for line in done.stdout.strip().splitlines()]
    # sora-predict on the same files.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sora_jax.export.predict",
            "--export",
            str(output),
            *files,
            "--top-k",
            "2",
            "--embeddings",
            str(tmp_path / "emb"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    predicted = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["path"] for r in client] == [r["path"] for r in predicted] == files
    for ours, theirs in zip(client[:2], predicted[:2], strict=True):
        assert set(ours) == {"path", "scores", "has_audio"}  # no warning: long enough
        assert ours["has_audio"] == theirs["has_audio"]
        assert list(ours["scores"]) == list(theirs["scores"]) == card["class_names"]
        np.testing.assert_allclose(
            list(ours["scores"].values()), list(theirs["scores"].values()), atol=1e-5
        )
    assert client[0]["has_audio"] and not client[1]["has_audio"]
    assert len(predicted[1]["top"]) == 2 and np.load(tmp_path / "emb" / "silent.npy").shape == (16,)
    assert "not a readable media file" in client[2]["error"] == predicted[2]["error"]
    expected = "0.25 s long, shorter than the model's window of 0.88 s"
    assert expected in client[3]["warning"] == predicted[3]["warning"]
    assert {"jax", "orbax", "av", "PIL", "numpy", "flatbuffers"} <= set(imported)


@pytest.mark.slow  # three client processes
def test_the_readme_and_model_card_code_runs_as_printed(exported, demo_data, tmp_path):
    """The README's client snippet, as printed, from a directory laid out as the README's
    commands leave it; and the model card's, in a process that has only the client's
    modules."""
    _, output, _ = exported
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "export").symlink_to(output)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo_raw").symlink_to(pathlib.Path(demo_data[0]).parent / "raw")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### 4. Export and predict") :]
    section = section[: section.index("\n## ")]
    card = (output / "model_card.md").read_text()
    snippets = [*_python_blocks(section), *_python_blocks(card)]
    snippets = [code for code in snippets if "tensorflow" not in code]  # SavedModel: below
    assert len(snippets) == 3  # the README's, then the card's client and raw-artifact code
    printed = []
    for i, code in enumerate(snippets):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(code)
        done, _ = _run_as_a_client(output, script, cwd=tmp_path)
        assert done.returncode == 0, (code, done.stderr[-3000:])
        printed.append(done.stdout)
    assert "'red_high':" in printed[0]  # the README's prints the scores of the demo clip


@pytest.mark.slow  # TensorFlow in a process of its own
def test_the_saved_model_gives_the_artifacts_outputs(exported, tmp_path):
    workdir, output, card = exported
    config = config_lib.load(workdir)
    inputs = _random_inputs(config, 3, 5)
    np.savez(tmp_path / "inputs.npz", **inputs)
    # TensorFlow in its own process, as a TF Serving user has it: the signature, as the
    # model card documents it, then the card's own example, as printed.
    (snippet,) = [c for c in _python_blocks((output / "model_card.md").read_text()) if "tf." in c]
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        saved = tf.saved_model.load("{output}/saved_model")
        serve = saved.signatures["serving_default"]
        inputs = dict(np.load("{tmp_path}/inputs.npz"))
        out = serve(**{{k: tf.constant(v) for k, v in inputs.items()}})
        np.savez("{tmp_path}/outputs.npz", **{{k: v.numpy() for k, v in out.items()}})
    """)
    done = subprocess.run(
        [sys.executable, "-c", script + "\n" + snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "outputs.npz")
    artifact = jax.export.deserialize((output / "model.jax").read_bytes())
    from orbax.checkpoint import StandardCheckpointer

    want = artifact.call(StandardCheckpointer().restore(output / "params"), inputs)
    assert set(got.files) == set(export_lib.exported_outputs(config)) == set(card["outputs"])
    for key in got.files:
        np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=1e-4, atol=1e-5)


def test_the_model_card_states_the_whole_input_contract(exported, tmp_path):
    _, output, card = exported
    config = config_lib.load(exported[0])
    shapes = InputSpec.from_config(config).shapes(1)
    assert list(card["inputs"]) == list(shapes)
    for name, (shape, dtype) in shapes.items():
        spec = card["inputs"][name]
        assert spec["shape"] == ["batch", *shape[1:]] and spec["meaning"], name
        assert spec["dtype"].split()[0] == dtype.name, name
    p = card["preprocessing"]
    assert (p["num_frames"], p["crop_size"], p["fps"]) == (
        config.data.num_frames,
        config.data.crop_size,
        config.data.fps,
    )
    assert p["short_side"] == 40 and p["temporal_views"] == config.data.eval_temporal_views
    assert card["outputs"]["logits"] == {
        "shape": ["batch", config.model.num_classes],
        "dtype": "float32",
        "meaning": export_lib.OUTPUT_MEANINGS["logits"],
    }
    md = (output / "model_card.md").read_text()
    for name in (*shapes, *card["outputs"]):
        assert f"| `{name}` |" in md, name
    # An export from before the card had the preprocessing is named, not misread.
    old = tmp_path / "old_export"
    old.mkdir()
    (old / "model_card.json").write_text(json.dumps({"class_names": ["a"], "inputs": {}}))
    with pytest.raises(ValueError, match="older sora-export"):
        Predictor(old)
    # The client is sora_jax's own media code, copied as it is.
    for source in (ROOT / "sora_jax" / "media").glob("*.py"):
        assert (output / "sora_media" / source.name).read_bytes() == source.read_bytes()


def test_export_never_deletes_what_it_did_not_write(exported, tmp_path, capsys, caplog):
    workdir, output, card = exported
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    # The work dir itself, or a parent of it: refused with exit code 2, nothing touched.
    for target in (workdir, workdir.parent):
        assert export_lib.main(["--workdir", str(workdir), "--output", str(target)]) == 2
        assert "would replace the work dir" in capsys.readouterr().err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
    # A directory holding other files: refused, the files kept.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(export_lib.OutputError, match=r"todo\.txt"):
        export_lib.export(workdir, other)
    assert (other / "todo.txt").read_text() == "keep me"
    # A previous export (a copy of the shared one, which other tests read) is replaced
    # whole, and no staging directory is left beside it.
    output = pathlib.Path(shutil.copytree(output, tmp_path / "previous_export"))
    before = (output / "model.jax").stat().st_ino
    again = export_lib.export(workdir, output)
    assert again["checkpoint_step"] == card["checkpoint_step"]
    assert (output / "model.jax").stat().st_ino != before  # a new file, moved in whole
    artifact = jax.export.deserialize((output / "model.jax").read_bytes())
    assert set(artifact.platforms) == set(card["platforms"])
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".export.")]
    assert not [p for p in output.parent.iterdir() if ".previous_export." in p.name]
    # A file a user added inside a previous export's subfolders: refused, kept.
    (output / "sora_media" / "NOTES.txt").write_text("mine")
    with pytest.raises(export_lib.OutputError, match=r"sora_media/NOTES\.txt"):
        export_lib.export(workdir, output)
    assert (output / "sora_media" / "NOTES.txt").read_text() == "mine"
    (output / "sora_media" / "NOTES.txt").unlink()
    # A file written into it after the last check, as the swap runs: kept beside it, named.
    previous = export_lib.check_output(output, Workdir(workdir))
    assert "model.jax" in previous
    staging = pathlib.Path(shutil.copytree(output, tmp_path / ".staging"))
    (output / "saved_model" / "assets").mkdir(parents=True, exist_ok=True)
    (output / "saved_model" / "assets" / "late.txt").write_text("mine too")
    with caplog.at_level(logging.WARNING):
        export_lib._swap_into_place(staging, output, previous)
    rescued = tmp_path / f"previous_export.not-an-export-{os.getpid()}"
    assert (rescued / "saved_model" / "assets" / "late.txt").read_text() == "mine too"
    assert storage.files_under(epath.Path(rescued)) == ["saved_model/assets/late.txt"]
    assert str(rescued) in caplog.text and "late.txt" in caplog.text
    assert export_lib.check_output(output, Workdir(workdir)) == previous
    # Inside the run's checkpoints: refused (it once broke eval, export and resume).
    with pytest.raises(export_lib.OutputError, match="inside the run's checkpoints/"):
        export_lib.export(workdir, workdir / "checkpoints" / "999")
    assert not (workdir / "checkpoints" / "999").exists()
    # A link to a previous export: the export it names is replaced; the link stays a link.
    link = tmp_path / "current"
    link.symlink_to(output)
    export_lib.export(workdir, link)
    assert link.is_symlink() and (link / "model_card.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "current" in p.name) == ["current"]


def test_an_export_to_a_full_disk_is_one_line_and_replaces_nothing(exported, tmp_path, capsys):
    workdir, _, _ = exported
    with small_disk(tmp_path, "300k") as disk:
        (disk / "export").mkdir()
        code = export_lib.main(["--workdir", str(workdir), "--output", str(disk / "export")])
        assert code == 2
        assert "sora-export: no space left for" in capsys.readouterr().err
        assert list((disk / "export").iterdir()) == []  # nothing replaced, nothing left
        assert [p.name for p in disk.iterdir()] == ["export"]


def test_a_work_dir_from_before_objectives_were_plug_ins_evaluates_and_exports(
    exported, tmp_path, capsys
):
    """Work dirs written before config.objectives kept the weights as `loss.supervised` and
    `loss.contrastive`, and had no `evals`: they load as the same run."""
    from sora_jax.train import cli

    workdir, _, card = exported
    old = pathlib.Path(shutil.copytree(workdir, tmp_path / "old_run"))
    saved = json.loads((old / "config.json").read_text())
    saved.pop("objectives"), saved.pop("evals")
    saved["loss"] = {"supervised": 1.0, "contrastive": 0.0}
    (old / "config.json").write_text(json.dumps(saved))
    config = config_lib.load(old)
    assert config.objectives.supervised.weight == 1.0
    assert config.objectives.contrastive.weight == config.objectives.av_sync.weight == 0.0
    capsys.readouterr()
    assert cli.eval_main(["--workdir", str(old)]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["top1"] == pytest.approx(card["metrics"]["full"]["top1"])
    again = export_lib.export(old, tmp_path / "export")
    assert again["objective"] == {"supervised": 1.0}
