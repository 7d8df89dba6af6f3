"""Decoding: KV cache == full recompute token for token; greedy follows the argmax path of a bigram chain;
samples of an exact-optimum model match the language's sentence probabilities; Xia's mixture; the job."""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis import generate as G
from data import sources, vocab
from lib import errors, sharding
from lib import hf_import as H
from lib import model as M

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
PROMPTS = [np.array([1, 5, 9, 3]), np.array([1, 7]), np.array([2, 4, 6, 8, 10, 12])]


def _random(cfg, seed=0):
  model = M.make(cfg)
  b = M.dummy_batch(cfg, 1, 8)
  params = model.init(jax.random.key(seed), b["inputs"])["params"]
  params = jax.tree.map(
    lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), jax.tree.map(jnp.asarray, params)
  )
  from flax import linen as nn

  return nn.unbox(params)


CFGS = {
  "nano": M.preset("nano", vocab_size=40, max_len=32),
  "modern_partial_rope": M.preset("tiny-modern", vocab_size=40, max_len=32, rotary_dim=8),
  "neox_parallel": M.preset(
    "nano", vocab_size=40, max_len=32, pos="rope", parallel_residual=True, mlp="gelu_exact", tied_embeddings=False
  ),
  "opt350_post_ln": M.preset("nano", vocab_size=40, max_len=32, post_ln=True, embed_proj_dim=8, mlp="relu"),
}


@pytest.mark.parametrize(
  "name, sampling",
  [
    ("nano", G.Sampling(0.0)),
    ("modern_partial_rope", G.Sampling(0.8, top_k=7, top_p=0.9)),
    ("neox_parallel", G.Sampling(1.0, top_p=0.8)),
    ("opt350_post_ln", G.Sampling(0.7, top_k=5)),
  ],
)
def test_cached_equals_uncached(name, sampling):
  cfg = CFGS[name]
  params = _random(cfg)
  kw = dict(sampling=sampling, seed=3, eos_id=2, pad_id=0)
  a = G.generate([(cfg, params)], PROMPTS, 12, cache=True, **kw)
  b = G.generate([(cfg, params)], PROMPTS, 12, cache=False, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)


def test_ragged_batch_equals_each_prompt_alone():
  cfg = CFGS["modern_partial_rope"]
  params = _random(cfg)
  batch = G.generate([(cfg, params)], PROMPTS, 8, sampling=G.Sampling(0.0))
  for i, p in enumerate(PROMPTS):
    alone = G.generate([(cfg, params)], [p], 8, sampling=G.Sampling(0.0))
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


@pytest.mark.slow
def test_cached_logits_equal_model_forward_on_imported_pythia():
  params, cfg, _ = H.load_params(os.path.join(FIX, "pythia", "step200"))
  ids = np.asarray([[0, 5, 9, 14, 20, 33, 41, 7]])
  ref = M.Transformer(cfg).apply({"params": params}, jnp.asarray(ids))
  valid = jnp.ones((1, 8), bool)
  pos = jnp.arange(8)[None]
  lg, cache = G.forward_cached(cfg, params, jnp.asarray(ids[:, :5]), pos[:, :5], G.empty_cache(cfg, 1, 8), 0, valid)
  np.testing.assert_allclose(lg, ref[:, :5], atol=1e-4)
  for t in range(5, 8):
    lg1, cache = G.forward_cached(cfg, params, jnp.asarray(ids[:, t : t + 1]), pos[:, t : t + 1], cache, t, valid)
    np.testing.assert_allclose(lg1[:, 0], ref[:, t], atol=1e-4)


def _optimum_bigram_model(lang):
  """A 0-layer transformer whose next-token distribution IS the bigram chain's (exactly, up to fp32):
  embed[i] = e_i - e_{V+i} has zero mean, so LayerNorm maps it to sqrt(V')·(e_i - e_{V+i}); the untied
  head's row i holds the chain's log-probs of the next token after token i."""
  n = lang.n_terminals
  V = vocab.vocab_size(n)
  D = 2 * V
  cfg = M.ModelConfig(vocab_size=V, d_model=D, n_layers=0, n_heads=1, d_ff=4, max_len=64, tied_embeddings=False)
  logp = np.full((V, V), -1e9, np.float32)
  logp[vocab.BOS, vocab.N_SPECIAL :] = np.log(lang.init_V)
  for a in range(n):
    logp[a + vocab.N_SPECIAL, vocab.N_SPECIAL :] = np.log1p(-lang.stop) + np.log(lang.trans_VxV[a])
    logp[a + vocab.N_SPECIAL, vocab.EOS] = np.log(lang.stop)
  embed = np.zeros((V, D), np.float32)
  embed[np.arange(V), np.arange(V)] = 1.0
  embed[np.arange(V), V + np.arange(V)] = -1.0
  scale = 1.0 / np.sqrt(1.0 / V + 1e-5)  # LayerNorm: var of e_i - e_{V+i} over 2V dims is 1/V
  head = np.zeros((D, V), np.float32)
  head[:V] = logp / scale
  params = {
    "embed": jnp.asarray(embed),
    "pos_embed": jnp.zeros((cfg.max_len + 2, D)),
    "final_norm": {"LayerNorm_0": {"scale": jnp.ones(D), "bias": jnp.zeros(D)}},
    "head": jnp.asarray(head),
  }
  return cfg, params


def test_greedy_follows_bigram_argmax_path():
  lang = sources.Bigram.random(seed=3, n_terminals=5, stop=0.2, max_len=64)
  cfg, params = _optimum_bigram_model(lang)
  g = G.generate([(cfg, params)], [np.array([vocab.BOS])], 20, sampling=G.Sampling(0.0), eos_id=vocab.EOS)
  path, prev = [], None
  for _ in range(20):
    if prev is None:
      nxt = int(np.argmax(lang.init_V))
    else:
      probs = np.append((1 - lang.stop) * lang.trans_VxV[prev], lang.stop)
      nxt = int(np.argmax(probs))
      if nxt == lang.n_terminals:
        path.append(vocab.EOS)
        break
    path.append(nxt + vocab.N_SPECIAL)
    prev = nxt
  assert g.tokens[0, : len(path)].tolist() == path


def test_sampled_sentence_frequencies_match_grammar():
  lang = sources.Bigram.random(seed=1, n_terminals=3, stop=0.6, max_len=64)
  cfg, params = _optimum_bigram_model(lang)
  n = 3000
  g = G.generate([(cfg, params)], [np.array([vocab.BOS])] * n, 24, sampling=G.Sampling(1.0), seed=0, eos_id=vocab.EOS)
  counts = collections.Counter(tuple(g.tokens[i, : g.lengths[i]].tolist()) for i in range(n))
  for sent, c in counts.most_common(8):
    ok, lp = G.grammar_score(lang, np.asarray(sent), len(sent), vocab.EOS, vocab.N_SPECIAL)
    assert ok
    p = np.exp(lp)
    assert abs(c / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (sent, c / n, p)
  in_lang = [G.grammar_score(lang, g.tokens[i], g.lengths[i], vocab.EOS, vocab.N_SPECIAL)[0] for i in range(n)]
  assert np.mean(in_lang) > 0.999


def test_filters():
  lg = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  f = G.filter_logits(lg, G.Sampling(1.0, top_k=2))
  assert np.isfinite(np.asarray(f)).tolist() == [[True, True, False, False]]
  f = G.filter_logits(lg, G.Sampling(1.0, top_p=0.7))  # 0.5 < 0.7 -> keep the second; 0.8 >= 0.7 -> stop
  assert np.isfinite(np.asarray(f)).tolist() == [[True, True, False, False]]
  f = G.filter_logits(lg, G.Sampling(1.0, top_p=0.4))
  assert np.isfinite(np.asarray(f)).tolist() == [[True, False, False, False]]


def test_mixture_clip_and_renormalise():
  pl, ps = jnp.asarray([[0.6, 0.3, 0.1]]), jnp.asarray([[0.2, 0.5, 0.3]])
  out = G.mix_logits([jnp.log(pl), jnp.log(ps)], [1.0, -1.0])
  expect = np.log(np.maximum(np.asarray(pl - ps), 0) + 1e-7)
  np.testing.assert_allclose(out, expect, rtol=1e-5)
  # renormalised by the sampler's softmax: p ∝ [0.4, 0, 0] -> token 0 always
  g = jax.nn.softmax(out)
  assert float(g[0, 0]) > 0.999
  # a mixture of a model with itself at (1, 0) decodes exactly like the model
  cfg = CFGS["nano"]
  pa, pb = _random(cfg, 0), _random(cfg, 5)
  one = G.generate([(cfg, pa)], PROMPTS, 6, sampling=G.Sampling(0.0))
  mix = G.generate([(cfg, pa), (cfg, pb)], PROMPTS, 6, sampling=G.Sampling(0.0), weights=[1.0, 0.0])
  np.testing.assert_array_equal(one.tokens, mix.tokens)
  a = G.generate([(cfg, pa), (cfg, pb)], PROMPTS, 6, sampling=G.Sampling(0.0), weights=[1.0, -1.0], cache=True)
  b = G.generate([(cfg, pa), (cfg, pb)], PROMPTS, 6, sampling=G.Sampling(0.0), weights=[1.0, -1.0], cache=False)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_sharded_params_decode_the_same():
  params, cfg, _ = H.load_params(os.path.join(FIX, "pythia", "step200"))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  p8, _, _ = H.load_params(os.path.join(FIX, "pythia", "step200"), mesh)
  s = G.Sampling(0.9, top_k=20)
  a = G.generate([(cfg, params)], PROMPTS, 10, sampling=s, seed=1)
  b = G.generate([(cfg, p8)], PROMPTS, 10, sampling=s, seed=1)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_prompt_too_long_is_one_clear_error():
  cfg = CFGS["nano"]
  with pytest.raises(errors.AnalysisError, match="exceeds the model's max_len 32"):
    G.generate([(cfg, _random(cfg))], [np.arange(30)], 8)


def test_repetition_metrics():
  assert G.distinct_n([1, 2, 1, 2, 1], 2) == 2 / 4
  assert G.repeated_ngram_rate([1, 2, 3, 1, 2, 3, 1], 3) == 2 / 5


@pytest.mark.slow
def test_job_on_a_trained_bigram_run_scores_by_the_grammar(tmp_path):
  import train
  from tests import helpers

  w = str(tmp_path / "run")
  cfg = helpers.tiny_cfg(
    str(tmp_path / "tfds"), **{"train.steps": 8, "ckpt.schedule": "explicit:steps=0/8", "ckpt.async_save": False}
  )
  train.train_and_evaluate(cfg, w)
  assert G.main([f"--workdir={w}", "--num=16", "--max_new=24", "--top_k=5"]) == 0
  df = G.load_generations(w)
  summ = G.load_generations(w, summary=True)
  steps = sorted(set(df.step))  # analysis and resume checkpoints
  assert {0, 8} <= set(steps) and len(df) == 16 * len(steps)
  assert {"in_language", "true_logprob", "distinct_2", "repeated_3gram_rate"} <= set(df.columns)
  lang = G._language(json.load(open(os.path.join(w, "config.json"))))
  for _, r in df[df.in_language].iterrows():  # exact scores recomputed independently
    words = np.asarray(r.tokens[:-1]) - vocab.N_SPECIAL
    assert r.true_logprob == pytest.approx(float(np.sum(lang.token_logprobs(words))))
  assert summ.fraction_in_language.between(0, 1).all() and summ.length_tv.between(0, 1).all()
  # learning the chain: more samples are sentences of the language after 8 steps than at init
  frac = summ.set_index("step").fraction_in_language
  assert frac[8] > frac[0]


@pytest.mark.slow
def test_mixture_job_on_two_imported_workdirs(tmp_path):
  large, small = str(tmp_path / "large"), str(tmp_path / "small")
  H.import_series([os.path.join(FIX, "pythia", "step200")], large)
  H.import_series([os.path.join(FIX, "pythia", "step0")], small)
  assert (
    G.main([f"--workdir={large}", f"--mix_with={small}@0", "--weights=1,-1", "--num=3", "--max_new=6", "--method=greedy"]) == 0
  )
  df = G.load_generations(large)
  assert all(list(w) == [1.0, -1.0] for w in df.mix_weights) and df.mix_with.str.endswith("@0").all()
  # the same decode through the library (no job) gives the same tokens
  from lib import ckpt

  models = [ckpt.load_model(w)[1] for w in (large, small)]
  params = [ckpt.restore_params(large), ckpt.restore_params(small, 0)]
  g = G.generate(list(zip(models, params)), [np.array([0])] * 3, 6, sampling=G.Sampling(0.0), eos_id=0, pad_id=1, weights=[1, -1])
  for i in range(3):
    assert df.tokens[i].tolist() == g.tokens[i, : g.lengths[i]].tolist()


def test_masked_lm_is_refused_by_the_causal_only_jobs(tmp_path, capsys):
  """Generation, mixture decoding and few-shot scoring read next-token probabilities: a masked-LM
  workdir is one clear line, nothing written."""
  import dataclasses
  import json

  from analysis import icl

  w = tmp_path / "mlm"
  w.mkdir()
  (w / "config.json").write_text(json.dumps({"model": dataclasses.asdict(dataclasses.replace(CFGS["nano"], causal=False))}))
  assert G.main([f"--workdir={w}"]) == 2
  assert "masked LM (model.causal=False): generation needs a causal LM" in capsys.readouterr().err
  assert icl.main([f"--workdir={w}", f"--tasks={tmp_path}"]) == 2
  assert "few-shot scoring" in capsys.readouterr().err
  assert sorted(os.listdir(w)) == ["config.json"]


def test_generate_takes_eos_and_pad_from_the_workdir(tmp_path, caplog):
  """Issue 25: generate() defaulted to pad 0 and no EOS whatever the model; the special ids now come from
  the workdir (an imported model's tokenizer: Pythia's eos 0, pad 1) unless given."""
  from lib import ckpt

  w = str(tmp_path / "pythia")
  H.import_series([os.path.join(FIX, "pythia", "step200")], w)
  _, cfg, _ = ckpt.load_model(w)
  params = ckpt.restore_params(w)
  assert G.special_ids(w) == {"bos": 0, "eos": 0, "pad": 1}
  assert G.special_ids({"data": {"source": {"kind": "bigram"}}}) == {"bos": vocab.BOS, "eos": vocab.EOS, "pad": vocab.PAD}
  prompts = [np.array([0, 5, 9]), np.array([0])]
  kw = dict(sampling=G.Sampling(1.0), seed=4)
  auto = G.generate([(cfg, params)], prompts, 24, workdir=w, **kw)
  explicit = G.generate([(cfg, params)], prompts, 24, eos_id=0, pad_id=1, **kw)
  np.testing.assert_array_equal(auto.tokens, explicit.tokens)
  np.testing.assert_array_equal(auto.lengths, explicit.lengths)
  # an explicit id still wins over the workdir's
  never = G.generate([(cfg, params)], prompts, 24, workdir=w, eos_id=None, **kw)
  assert (never.lengths == 24).all()
  # neither a workdir nor ids: no silent stopping rule
  caplog.set_level("WARNING")
  G.generate([(cfg, params)], prompts, 4, **kw)
  assert "no eos_id and no workdir" in caplog.text


@pytest.mark.parametrize("name", ["nano", "neox_parallel"])
def test_ragged_batch_loss_equals_each_sequence_alone(name):
  """Left padding with positions from each sequence's first token and pad slots in their own segment:
  per_token_loss of the padded batch equals every sequence's loss computed alone, unpadded."""
  cfg = CFGS[name]
  params, model = _random(cfg), M.make(cfg)
  seqs = [np.array([1, 5, 9, 3, 7, 11, 2]), np.array([1, 7]), np.array([1, 4, 6, 8, 10])]
  batch = M.ragged_batch(seqs, pad_id=0)
  assert batch["inputs"].shape == (3, 6) and batch["mask"].sum() == 6 + 1 + 4
  assert (batch["segment_ids"][1] == [0, 0, 0, 0, 0, 1]).all() and (batch["positions"][2] == [0, 0, 0, 1, 2, 3]).all()
  loss = np.asarray(M.per_token_loss(model, params, jax.tree.map(jnp.asarray, batch)))
  for i, s in enumerate(seqs):
    alone = M.ragged_batch([s], pad_id=0)
    want = np.asarray(M.per_token_loss(model, params, jax.tree.map(jnp.asarray, alone)))[0]
    np.testing.assert_allclose(loss[i][batch["mask"][i] > 0], want, atol=2e-5)
  with pytest.raises(errors.DataError, match="at least two tokens"):
    M.ragged_batch([np.array([1])], pad_id=0)


def test_text_batch_uses_the_workdir_tokenizer_and_scores_as_alone(tmp_path):
  from lib import ckpt

  w = str(tmp_path / "pythia")
  H.import_series([os.path.join(FIX, "pythia", "step100")], w)
  model, _, _ = ckpt.load_model(w)
  params = ckpt.restore_params(w)
  texts = ["the cat sat", "a"]
  batch = G.text_batch(w, texts)
  assert (np.diff(batch["mask"], axis=1) >= 0).all() and (batch["inputs"][batch["mask"] == 0] == 1).all()  # left pads, id 1
  loss = np.asarray(M.per_token_loss(model, params, jax.tree.map(jnp.asarray, batch)))
  for i, t in enumerate(texts):
    one = G.text_batch(w, [t])
    want = np.asarray(M.per_token_loss(model, params, jax.tree.map(jnp.asarray, one)))[0]
    np.testing.assert_allclose(loss[i][batch["mask"][i] > 0], want, atol=2e-5)
    assert one["inputs"][0, 0] == 0  # Pythia's BOS
