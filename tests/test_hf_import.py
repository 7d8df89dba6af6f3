"""HF import: per-token log-probs equal transformers' (golden fixtures), sharded loading, workdir, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import ckpt, errors, sharding
from lib import hf_import as H
from lib import model as M

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
EXPECTED = json.load(open(os.path.join(FIX, "expected.json")))
PYTHIA = [os.path.join(FIX, "pythia", f"step{s}") for s in (0, 100, 200)]


def _logprobs(cfg, params, ids):
  logits = M.Transformer(cfg).apply({"params": params}, jnp.asarray(ids))
  lp = jax.nn.log_softmax(logits, -1)[:, :-1]
  return np.take_along_axis(np.asarray(lp), np.asarray(ids)[:, 1:, None], -1)[..., 0]


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_logprobs_equal_transformers(family):
  params, cfg, _ = H.load_params(os.path.join(FIX, family))
  e = EXPECTED[family]
  ours = _logprobs(cfg, params, np.asarray(e["ids"]))
  np.testing.assert_allclose(ours, np.asarray(e["logprobs"]), atol=1e-4, rtol=0)


def test_family_options():
  opt350 = H.model_config(H.read_hf_config(os.path.join(FIX, "opt350")))
  assert opt350.post_ln and opt350.embed_proj_dim == 8
  neox = H.model_config(H.read_hf_config(PYTHIA[0]))
  assert neox.parallel_residual and neox.rotary_dim == 4 and not neox.tied_embeddings and neox.mlp == "gelu_exact"
  gpt2 = H.model_config(H.read_hf_config(os.path.join(FIX, "gpt2")))
  assert gpt2.tied_embeddings and gpt2.mlp == "gelu" and not gpt2.post_ln


@pytest.mark.parametrize("family", ["pythia/step200", "gpt2", "opt350"])
def test_sharded_load_equals_single_device(family):
  src = os.path.join(FIX, family)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  p8, cfg, _ = H.load_params(src, mesh)
  p1, _, _ = H.load_params(src)
  shards = jax.tree.leaves(jax.tree.map(lambda x: len(x.sharding.device_set), p8))
  assert max(shards) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p8, p1)


def test_import_series_and_restore(tmp_path):
  w = str(tmp_path / "pythia")
  assert H.main([f"--src={','.join(PYTHIA)}", f"--workdir={w}", f"--probe_text={FIX}/corpus.txt"]) == 0
  assert sorted(ckpt.available_steps(w)) == [0, 100, 200]
  cfg = ckpt.read_config(w)
  assert cfg["import"]["model_type"] == "gpt_neox" and cfg["import"]["special_ids"] == {"bos": 0, "eos": 0, "pad": 1}
  assert os.path.exists(os.path.join(w, "tokenizer", "tokenizer.json"))
  assert not os.path.exists(w + ".partial")
  model, mcfg, _ = ckpt.load_model(w)
  e = EXPECTED["pythia/step100"]
  np.testing.assert_allclose(_logprobs(mcfg, ckpt.restore_params(w, 100), np.asarray(e["ids"])), e["logprobs"], atol=1e-4)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.parametrize(
  "case, match",
  [
    ("no_weights", "holds no weights"),
    ("unknown_arch", "unknown architecture model_type='llama'"),
    ("bad_tokenizer", "embeds only"),
    ("missing_tensor", "is missing from the weights"),
    ("two_archs", "different architecture"),
  ],
)
def test_bad_input_one_line_nothing_written(tmp_path, capsys, case, match):
  src = _copy(PYTHIA[0], tmp_path / "src" / "step0")
  srcs = [src]
  if case == "no_weights":
    os.remove(os.path.join(src, "model.safetensors"))
  elif case == "unknown_arch":
    c = json.load(open(os.path.join(src, "config.json")))
    c["model_type"] = "llama"
    json.dump(c, open(os.path.join(src, "config.json"), "w"))
  elif case == "bad_tokenizer":
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    tk.add_tokens([f"extra{i}" for i in range(40)])  # 96 + 40 tokens for a 96-row embedding
    tk.save(os.path.join(src, "tokenizer.json"))
  elif case == "missing_tensor":
    from safetensors.numpy import load_file, save_file

    t = load_file(os.path.join(src, "model.safetensors"))
    t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias")
    save_file(t, os.path.join(src, "model.safetensors"))
  elif case == "two_archs":
    srcs = [src, _copy(os.path.join(FIX, "gpt2"), tmp_path / "src" / "step5")]
  w = str(tmp_path / "w")
  assert H.main([f"--src={','.join(srcs)}", f"--workdir={w}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0], err
  assert not os.path.exists(w) and not os.path.exists(w + ".partial")


def test_steps_from_names():
  assert H.step_of("/x/pythia-70m/step143000") == 143000
  assert H._steps(["a/step1", "b/step20"], None) == [1, 20]
  with pytest.raises(errors.ConfigError, match="cannot read a step"):
    H._steps(["a", "b"], None)
  assert H._steps(["a", "b"], "3,4") == [3, 4]


def test_bfloat16_safetensors_are_read(tmp_path):
  from safetensors.flax import save_file

  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  save_file({"a": x.astype(jnp.bfloat16)}, str(tmp_path / "model.safetensors"))
  tf = H.TensorFiles(str(tmp_path))
  np.testing.assert_array_equal(tf.read("a", (slice(1, 3), slice(0, 2))), np.asarray(x)[1:3, 0:2])


def test_pytorch_bin_weights_equal_safetensors(tmp_path):
  torch = pytest.importorskip("torch")  # optional: .bin import needs torch (not in requirements)
  from safetensors.numpy import load_file

  src = _copy(PYTHIA[1], tmp_path / "step100")
  t = load_file(os.path.join(src, "model.safetensors"))
  torch.save({k: torch.from_numpy(v.copy()) for k, v in t.items()}, os.path.join(src, "pytorch_model.bin"))
  os.remove(os.path.join(src, "model.safetensors"))
  params, cfg, _ = H.load_params(src)
  e = EXPECTED["pythia/step100"]
  np.testing.assert_allclose(_logprobs(cfg, params, np.asarray(e["ids"])), e["logprobs"], atol=1e-4)


def test_tokens_per_step_recorded(tmp_path):
  w = str(tmp_path / "w")
  H.import_series(PYTHIA[1:2], w, tokens_per_step=1000)
  assert ckpt.read_meta(w, 100)["tokens_seen"] == 100_000


def test_step_is_read_from_the_revision_folder_own_name_only(tmp_path, capsys):
  """Issue 25: `--src=/data/step2_runs/opt-125m` was silently step 2 (a `step<N>` anywhere in the path)."""
  assert H.step_of("/data/step2_runs/opt-125m") is None
  assert H.step_of("/data/step2_runs/pythia/step300/") == 300
  assert H.step_of("/x/checkpoint-500") == 500 and H.step_of("/x/pythia-70m-step3000") == 3000 and H.step_of("/x/1000") == 1000
  with pytest.raises(errors.ConfigError, match=r"names several steps \[100, 200\]"):
    H.step_of("/x/step100-step200")
  with pytest.raises(errors.ConfigError, match="cannot read a step from the folder name of 'runs/step5/b'"):
    H._steps(["runs/step5/a/step1", "runs/step5/b"], None)
  with pytest.raises(errors.ConfigError, match=r"same step \[7\]"):
    H._steps(["a/step7", "b/checkpoint-7"], None)
  with pytest.raises(errors.ConfigError, match="not comma-separated integers"):
    H._steps(["a", "b"], "1,x")
  # end to end: a single revision under a 'step2_runs' parent is step 0 (or --steps), never 2
  src = _copy(PYTHIA[1], tmp_path / "step2_runs" / "pythia-70m")
  w = str(tmp_path / "w")
  assert H.main([f"--src={src}", f"--workdir={w}"]) == 0
  assert sorted(ckpt.available_steps(w)) == [0]
  w2 = str(tmp_path / "w2")
  assert H.main([f"--src={src},{src}", f"--workdir={w2}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot read a step from the folder name" in err[0] and not os.path.exists(w2)


def test_step_of_a_hugging_face_cache_snapshot_comes_from_its_ref(tmp_path):
  """HF's cache stores revision `step1000` as snapshots/<commit> with refs/step1000 holding the commit."""
  repo = tmp_path / "models--EleutherAI--pythia-70m"
  sha_a, sha_b = "a" * 40, "b" * 40
  for sha in (sha_a, sha_b):
    (repo / "snapshots" / sha).mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "step1000").write_text(sha_a)
  (repo / "refs" / "main").write_text(sha_b)
  (repo / "refs" / "step143000").write_text(sha_b)
  assert H.step_of(str(repo / "snapshots" / sha_a)) == 1000
  assert H.step_of(str(repo / "snapshots" / sha_b)) == 143000
  (repo / "refs" / "step9").write_text(sha_a)
  with pytest.raises(errors.ConfigError, match="several steps"):
    H.step_of(str(repo / "snapshots" / sha_a))
