"""sora-export and sora-predict: exact equality with the trained model and with sora-eval,
and an artifact that runs without sora_jax."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sora_jax import config as config_lib
from sora_jax.export import export as export_lib
from sora_jax.export.predict import Predictor
from sora_jax.inputs import InputSpec
from sora_jax.train import setup, trainer
from sora_jax.train.evaluate import Evaluator
from tests.conftest import ONE_DEVICE, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(demo_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(*demo_data)
    config.total_steps = 4
    trainer.train(config, workdir, ONE_DEVICE)
    output = workdir / "export"
    card = export_lib.export(workdir, output)
    return workdir, output, card


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
    for batch in (3, 7):
        inputs = _random_inputs(config, batch, batch)
        got = artifact.call(exported_params, inputs)
        want = model.apply({"params": params}, inputs, modality_embeddings=True)
        assert set(got) == set(export_lib.EXPORTED_OUTPUTS)
        for key in ("logits", "embedding", "video_embedding", "audio_embedding"):
            rel = np.linalg.norm(np.asarray(got[key]) - np.asarray(want[key])) / np.linalg.norm(
                np.asarray(want[key])
            )
            assert rel < 1e-5, (batch, key, rel)
    float_artifact = jax.export.deserialize((output / "model_float.jax").read_bytes())
    inputs = _random_inputs(config, 3, 0)
    as_float = dict(inputs, audio=inputs["audio"].astype(np.float32) / 32768.0)
    np.testing.assert_allclose(
        float_artifact.call(exported_params, as_float)["logits"],
        artifact.call(exported_params, inputs)["logits"],
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


def test_sora_predict_command_handles_silent_and_corrupt_files(exported, tmp_path):
    _, output, _ = exported
    from tests.media import write_clip

    silent = write_clip(tmp_path / "silent.mp4", seconds=2.0, fps=8, audio=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01" * 500)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sora_jax.export.predict",
            "--export",
            str(output),
            str(broken),
            str(silent),
            "--top-k",
            "2",
            "--embeddings",
            str(tmp_path / "emb"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 3
    broken_line, silent_line = (json.loads(x) for x in done.stdout.strip().splitlines())
    assert "not a readable media file" in broken_line["error"]
    assert silent_line["has_audio"] is False and len(silent_line["top"]) == 2
    assert np.load(tmp_path / "emb" / "silent.npy").shape == (16,)


def test_an_export_runs_in_a_process_that_cannot_import_sora_jax(exported, tmp_path):
    _, output, _ = exported
    script = textwrap.dedent(f"""
        import sys
        sys.modules["sora_jax"] = None  # any import of sora_jax now fails
        import json
        import jax, numpy as np
        import orbax.checkpoint as ocp
        card = json.load(open("{output}/model_card.json"))
        model = jax.export.deserialize(open("{output}/model.jax", "rb").read())
        params = ocp.StandardCheckpointer().restore("{output}/params")
        frames = card["inputs"]["frames"]["shape"][1:]
        n = card["inputs"]["audio"]["samples"]
        b = 2
        inputs = dict(frames=np.zeros((b, *frames), np.uint8),
                      frame_mask=np.ones((b, frames[0]), bool),
                      audio=np.zeros((b, n), np.int16), audio_len=np.full((b,), n, np.int32),
                      has_video=np.ones(b, bool), has_audio=np.ones(b, bool))
        out = model.call(params, inputs)
        assert out["logits"].shape == (b, len(card["class_names"]))
        assert not any(m.startswith("sora_jax") for m in sys.modules if sys.modules[m])
        print("ok")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_export_never_deletes_what_it_did_not_write(exported, tmp_path, capsys):
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
    # A previous export is replaced whole, and no staging directory is left beside it.
    before = (output / "model.jax").stat().st_ino
    again = export_lib.export(workdir, output)
    assert again["checkpoint_step"] == card["checkpoint_step"]
    assert (output / "model.jax").stat().st_ino != before  # a new file, moved in whole
    artifact = jax.export.deserialize((output / "model.jax").read_bytes())
    assert set(artifact.platforms) == set(card["platforms"])
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".export.")]
