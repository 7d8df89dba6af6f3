"""bench.aot: a mesh that cannot divide the batch or the heads is refused in one line before compiling
(no libtpu needed); the collectives parser on compiled-HLO lines; a nano card compiled for v5e:2x2
(marked `tpu_aot`: needs libtpu, see docs/aot.md)."""

import importlib.util

import pytest

from bench import aot
from lib import errors


def test_topology_names_and_device_counts():
  assert aot.device_count("v5e:4x4") == 16 and aot.device_count("v5e:16x16") == 256
  assert aot.device_count("v5p:4x4x4") == 64 and aot.device_count("v4:4x4x4") == 128  # v4 lists both cores of a chip
  with pytest.raises(errors.ConfigError, match=r"--topology='a100:8': expected"):
    aot.parse_topology("a100:8")


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--batch=24", "--mesh.fsdp=16"], "global batch 24 in 1 micro-batch(es) of 24 rows cannot be split over data x fsdp = 16"),
    (["--batch=64", "--mesh.fsdp=16", "--grad_accum=8"], "global batch 64 in 8 micro-batch(es) of 8 rows cannot be split"),
    (["--batch=64", "--mesh.fsdp=-1", "--mesh.tensor=16"], "tensor=16 does not divide the model's 12 heads"),
    (["--mesh.fsdp=3"], "uses 3 devices but 16 are available"),
  ],
)
def test_bad_mesh_is_refused_before_compiling(flags, message, capsys, monkeypatch):
  compiled = []
  monkeypatch.setattr(aot, "compile_one", lambda *a, **k: compiled.append(a))
  monkeypatch.setattr(aot, "_check_libtpu", lambda: compiled.append("libtpu"))
  assert aot.main(["--config=configs/opt.py:opt-125m", "--topology=v5e:4x4", *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "\n" not in err and err.startswith("lmtrace: error:")
  assert compiled == []  # refused before libtpu is even looked for


def test_collectives_parsed_from_hlo_lines():
  hlo = "\n".join(
    [
      "  %all-gather.1 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%p), channel_id=3, "
      "replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}",
      "  %all-reduce.2 = (f32[16]{0:T(128)}, /*index=1*/f32[]{:T(128)}) all-reduce(%a, %b), channel_id=4, "
      "replica_groups=[2,8]<=[16], to_apply=%add",
      "  %reduce-scatter.3 = f32[4,8]{1,0} reduce-scatter(%g), replica_groups={{0,1},{2,3}}, dimensions={0}",
      "  %collective-permute-start.4 = (bf16[64,16]{1,0}, bf16[64,16]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) "
      "collective-permute-start(%x), channel_id=9, source_target_pairs={{0,1},{1,0}}",
    ]
  )
  c = aot.collectives(hlo)
  assert c["all-gather"] == {"count": 1, "bytes": 32 * 64 * 2, "traffic": 32 * 64 * 2 * 3 / 4}
  assert c["all-reduce"]["bytes"] == 17 * 4 and c["all-reduce"]["traffic"] == 2 * 17 * 4 * 7 / 8
  assert c["reduce-scatter"]["traffic"] == 4 * 8 * 4 / 2
  assert c["collective-permute"] == {"count": 1, "bytes": 64 * 16 * 2, "traffic": 64 * 16 * 2}  # not the u32 contexts


def test_collectives_inside_loops_count_their_trip_counts():
  """A collective in a scanned layer body (trip count 24) inside the micro-batch loop (4) runs 96 times per
  step; one in the micro-batch body 4 times; one at top level once. Trip counts come from `i < N` conditions."""
  ag = "  %all-gather.{i} = bf16[8]{{0}} all-gather(%p), replica_groups=[1,4]<=[4], dimensions={{0}}"
  hlo = "\n".join(
    [
      "%layer_cond (p: (s32[])) -> pred[] {",
      "  %constant.1 = s32[]{:T(128)} constant(24)",
      "  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.1), direction=LT",
      "}",
      "%layer_body (p: (s32[])) -> (s32[]) {",
      ag.format(i=1),
      "}",
      "%micro_cond (p: (s32[])) -> pred[] {",
      "  %constant.2 = s32[] constant(4)",
      "  ROOT %lt.2 = pred[] compare(%gte.2, %constant.2), direction=LT",
      "}",
      "%micro_body (p: (s32[])) -> (s32[]) {",
      ag.format(i=2),
      "  %w.1 = (s32[]) while(%t), condition=%layer_cond, body=%layer_body, metadata={}",
      "}",
      "ENTRY %main (p: f32[]) -> f32[] {",
      ag.format(i=3),
      "  %w.2 = (s32[]) while(%t2), condition=%micro_cond, body=%micro_body",
      "}",
    ]
  )
  w = aot.loop_weights(hlo)
  assert (w["main"], w["micro_body"], w["layer_body"]) == (1, 4, 96)
  c = aot.collectives(hlo)["all-gather"]
  assert c["count"] == 1 + 4 + 96 and c["bytes"] == 101 * 16 and c["traffic"] == 101 * 16 * 3 / 4


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='needs libtpu: pip install "jax[tpu]==<jax version>"')
def test_nano_card_compiles_for_v5e_2x2(capsys):
  assert aot.main(["--config=configs/base.py:nano", "--topology=v5e:2x2", "--batch=8", "--seq_len=64"]) == 0
  out = capsys.readouterr().out
  assert "FITS" in out and "all-gather" in out and "bound by" in out
  # the scanned layer stack with remat, and the flatness job's Hessian-vector product, of the same card
  args = ["--config=configs/base.py:nano", "--topology=v5e:2x2", "--batch=8", "--seq_len=64"]
  assert aot.main([*args, "--remat", "--scan_layers"]) == 0
  out = capsys.readouterr().out
  assert "layers=scanned" in out and "FITS" in out
  assert aot.main([*args, "--program=hvp"]) == 0
  out = capsys.readouterr().out
  assert "hvp: data=1 fsdp=4" in out and "FITS" in out
  assert aot.main([*args, "--program=hvp", "--grad_accum=2"]) == 2
