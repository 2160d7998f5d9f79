"""Plane extraction by statistics, on tiny random-weight Qwen2 and Llama models (fast)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from rotserve.extract import ExtractConfig, ExtractionError, extract_from_loaded, extract_plane
from rotserve.extract.activations import ActivationReader, PaddingError
from rotserve.extract.candidates import (
    HARMFUL,
    HARMLESS,
    ClassSums,
    auroc,
    candidate_table,
    cohens_d,
)
from rotserve.extract.cli import build_parser, config_from_args, main
from rotserve.extract.first_axis import SELECT_RULES, select_first_axis
from rotserve.extract.second_axis import SECOND_METHODS
from rotserve.hf.generate import load_hf_model
from rotserve.plane import load_plane
from rotserve.prompts import ChatTemplateError, PromptFileError, load_prompts
from rotserve.steering import UnsupportedArchitectureError

ROOT = Path(__file__).resolve().parents[1]
HARMFUL_FILE = ROOT / "data" / "prompts" / "harmful.jsonl"
HARMLESS_FILE = ROOT / "data" / "prompts" / "harmless.jsonl"
N = 12  # prompts per class: enough for every statistic, fast on a 2-layer model


def _prompts(n: int = N) -> dict[str, list[str]]:
    return {
        HARMFUL: [p.instruction for p in load_prompts(HARMFUL_FILE, limit=n)],
        HARMLESS: [p.instruction for p in load_prompts(HARMLESS_FILE, limit=n)],
    }


def _cfg(**kw) -> ExtractConfig:
    kw.setdefault("out", None)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 5)  # several batches, uneven last one
    return ExtractConfig(**kw)


def _assert_orthonormal(plane) -> None:
    b1, b2 = plane.b1.double(), plane.b2.double()
    assert abs(float(b1.norm()) - 1) < 1e-5
    assert abs(float(b2.norm()) - 1) < 1e-5
    assert abs(float(b1 @ b2)) < 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny matmuls on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def loaded(tiny_qwen2, tiny_llama):
    return {"qwen2": load_hf_model(tiny_qwen2), "llama": load_hf_model(tiny_llama)}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sites_and_shapes(loaded, arch):
    model, tok = loaded[arch]
    res = extract_from_loaded(model, tok, _prompts(), _cfg())
    names = [s.name for s in res.sites]
    assert names == ["L0.resid_mid", "L0.resid_post", "L1.resid_mid", "L1.resid_post"]
    assert res.candidates.d.shape == (4, 128) and res.candidates.d.dtype == torch.float32
    assert len(res.table) == 4 and sum(r.chosen for r in res.table) == 1
    assert all(r.auroc is not None and 0 <= r.auroc <= 1 for r in res.table)
    d_norms = res.candidates.d.norm(dim=1)
    assert torch.allclose(d_norms, torch.ones(4), atol=1e-5)
    _assert_orthonormal(res.plane)
    assert res.plane.meta.hidden_size == 128
    # b1 is the chosen site's candidate: max_sim picks a candidate, it does not blend them.
    assert float(res.plane.b1 @ res.candidates.d[res.chosen]) > 0.9999


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_left_padding_matches_one_at_a_time(loaded, arch):
    model, tok = loaded[arch]
    prompts = _prompts(6)
    batched = extract_from_loaded(model, tok, prompts, _cfg(batch_size=6, holdout=0))
    single = extract_from_loaded(model, tok, prompts, _cfg(batch_size=1, holdout=0))
    assert torch.allclose(batched.candidates.r, single.candidates.r, atol=1e-5)
    assert torch.allclose(batched.plane.basis, single.plane.basis, atol=1e-4)


def test_padding_check_catches_right_padding(loaded):
    model, tok = loaded["qwen2"]
    reader = ActivationReader(model, tok, progress=False)
    prompts = _prompts()[HARMFUL][:4]
    assert reader.encode(prompts).weights[:, -1].eq(1).all()
    tok.padding_side = "right"
    try:
        with pytest.raises(PaddingError, match="left padding"):
            reader.encode(prompts)
    finally:
        tok.padding_side = "left"


def test_post_instruction_positions_average_the_template_tail(loaded):
    model, tok = loaded["qwen2"]
    reader = ActivationReader(model, tok, positions="post-instruction", progress=False)
    enc = reader.encode(["Say hi", "Explain how to bake a loaf of bread at home"])
    # <|im_end|> \n <|im_start|> assistant \n : the same tail for every prompt, at the end.
    tail = (enc.weights > 0).sum(1)
    assert tail[0] == tail[1] and tail[0] >= 2
    assert torch.allclose(enc.weights.sum(1), torch.ones(2))
    assert (enc.weights[:, -int(tail[0]) :] > 0).all()
    res = extract_from_loaded(model, tok, _prompts(), _cfg(positions="post-instruction"))
    _assert_orthonormal(res.plane)
    assert res.plane.meta.method["positions"] == "post-instruction"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_planted_direction_is_recovered(loaded, arch):
    """Same instructions in both classes; harmful ones get a known vector added after layer 0."""
    model, tok = loaded[arch]
    instructions = _prompts(16)[HARMLESS]
    reader = ActivationReader(model, tok, batch_size=6, progress=False)
    v = torch.randn(128, generator=torch.Generator().manual_seed(3))
    v = v / v.norm()

    def plant(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        # Small next to ||h||, so a/||a|| moves linearly along v and the mean difference is v.
        h = h + 0.05 * h.norm(dim=-1, keepdim=True) * v
        return (h, *output[1:]) if isinstance(output, tuple) else h

    sums = ClassSums(len(reader.sites), reader.hidden)
    handle = reader.layers[0].layer.register_forward_hook(plant)
    try:
        for acts in reader.batches(instructions):
            sums.update(acts, HARMFUL)
    finally:
        handle.remove()
    for acts in reader.batches(instructions):
        sums.update(acts, HARMLESS)
    cands = sums.candidates()
    names = [s.name for s in reader.sites]
    planted = names.index("L0.resid_post")
    assert float(cands.d[planted] @ v) > 0.99
    # Upstream of the plant the classes are identical: no direction, and never chosen.
    assert float(cands.norms[names.index("L0.resid_mid")]) < 1e-6
    # Selection inside a window around the plant finds it (downstream, attention and MLP
    # of a random model mix v with other directions, so only the planting site is exact).
    window = [0, 1]
    table = candidate_table(reader.sites, cands, window)
    for method in ("max_norm", "max_sim"):
        first = select_first_axis(method, table, cands, window)
        assert first.index == planted, method
        assert float(first.b1 @ v) > 0.99


def test_every_select_and_second_gives_an_orthonormal_plane(loaded):
    model, tok = loaded["qwen2"]
    prompts = _prompts()
    seen = {}
    # Each b1 rule with the default b2, each b2 rule with the default b1, and one mixed pair:
    # the two axes are chosen independently, so that covers every code path.
    combos = [(s, "pca") for s in SELECT_RULES] + [("max_sim", x) for x in list(SECOND_METHODS)[1:]]
    for select, second in [*combos, ("separability", "per-sample")]:
        res = extract_from_loaded(model, tok, prompts, _cfg(select=select, second=second))
        _assert_orthonormal(res.plane)
        m = res.plane.meta.method
        assert (m["select"], m["second"]) == (select, second)
        seen[(select, second)] = res
    assert seen[("mean", "pca")].chosen is None
    sep = seen[("separability", "pca")]
    best = max(r.auroc for r in sep.table)
    assert sep.table[sep.chosen].auroc == pytest.approx(best)
    assert seen[("max_sim", "per-sample")].second_info["rows"] == 2 * N * 4
    assert "ref_cos_in_plane" in seen[("max_sim", "last-pcs")].second_info
    # The full control: both axes random, reproducible by seed, unlike the extracted plane.
    ctrl = extract_from_loaded(model, tok, prompts, _cfg(random_b1=True, second="random"))
    ctrl2 = extract_from_loaded(model, tok, prompts, _cfg(random_b1=True, second="random"))
    _assert_orthonormal(ctrl.plane)
    assert torch.equal(ctrl.plane.basis, ctrl2.plane.basis)
    assert abs(float(ctrl.plane.b1 @ seen[("max_sim", "pca")].plane.b1)) < 0.5
    assert ctrl.plane.meta.method["random_b1"] is True


def test_layer_window_restricts_the_choice(loaded):
    model, tok = loaded["qwen2"]
    res = extract_from_loaded(model, tok, _prompts(), _cfg(layers="0:1", select="max_norm"))
    assert res.sites[res.chosen].layer == 0
    assert [r.in_window for r in res.table] == [True, True, False, False]
    assert res.plane.meta.method["window"] == ["L0.resid_mid", "L0.resid_post"]
    with pytest.raises(ExtractionError, match="--layers '5:9' selects none of the model's 2"):
        extract_from_loaded(model, tok, _prompts(), _cfg(layers="5:9"))


def test_layer_window_takes_the_one_window_grammar(loaded):
    """Negative layers count from the end, as for serve, grid and requests (2-layer model)."""
    model, tok = loaded["qwen2"]
    for window, layers in (("-1:", {1}), ("-2:", {0, 1}), ("0,-1", {0, 1}), ("all", {0, 1})):
        res = extract_from_loaded(model, tok, _prompts(4), _cfg(layers=window, holdout=0.5))
        assert {s.layer for s, r in zip(res.sites, res.table, strict=True) if r.in_window} == layers
    with pytest.raises(ExtractionError, match="--layers: layer 2 is out of range"):
        extract_from_loaded(model, tok, _prompts(4), _cfg(layers="0,2"))


def test_saved_plane_metadata_round_trips(tiny_qwen2, tmp_path):
    out = tmp_path / "p.safetensors"
    res = extract_plane(
        _cfg(
            model=str(tiny_qwen2),
            harmful=str(HARMFUL_FILE),
            harmless=str(HARMLESS_FILE),
            limit=N,
            out=str(out),
            select="separability",
        )
    )
    plane = load_plane(out, hidden_size=128)
    assert torch.equal(plane.basis, res.plane.basis)
    m = plane.meta
    assert m.model == str(tiny_qwen2) and m.hidden_size == 128
    assert m.method["select"] == "separability" and m.method["second"] == "pca"
    assert m.method["site_name"] == res.sites[res.chosen].name
    assert m.method["layer"] == res.sites[res.chosen].layer
    assert m.method["positions"] == "last" and m.method["holdout"] == 0.25
    assert m.data[HARMFUL]["count"] == N and m.data[HARMLESS]["count"] == N
    assert m.data[HARMFUL]["calibration"] + m.data[HARMFUL]["heldout"] == N
    assert len(m.data[HARMFUL]["file_sha256"]) == 64
    assert [c["site"] for c in m.candidates] == [s.name for s in res.sites]
    assert [c["chosen"] for c in m.candidates].count(True) == 1
    # The class means' projections on b1, per site: what `--layers selective` reads.
    from rotserve.plane import selective_layers

    assert all(isinstance(c["harmful_b1"], float) for c in m.candidates)
    chosen = next(c for c in m.candidates if c["chosen"])
    assert chosen["harmful_b1"] > chosen["harmless_b1"]  # b1 points from harmless to harmful
    assert set(selective_layers(plane)) <= {0, 1}
    doc = json.loads((tmp_path / "p.candidates.json").read_text())
    assert doc["plane"]["plane_id"] == plane.plane_id and len(doc["candidates"]) == 4
    rows = list(csv.DictReader(open(tmp_path / "p.candidates.csv")))
    assert {"site", "layer", "norm", "mean_cosine", "auroc", "cohens_d", "chosen"} <= set(rows[0])
    assert (tmp_path / "p.candidates.png").stat().st_size > 10_000


def test_bad_inputs(tiny_qwen2, tmp_path, loaded, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one = tmp_path / "one.jsonl"
    one.write_text('{"instruction": "Explain how to pick a lock"}\n')
    base = dict(model=str(tiny_qwen2), harmless=str(HARMLESS_FILE), limit=N)
    with pytest.raises(PromptFileError, match="empty"):
        extract_plane(_cfg(harmful=str(empty), **base))
    with pytest.raises(ExtractionError, match="at least 2"):
        extract_plane(_cfg(harmful=str(one), **base))

    # A model whose tokenizer has no chat template: a clear error naming the fix, which works.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_qwen2, bare)
    template = (bare / "chat_template.jinja").read_text()
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="--chat-template FILE"):
        extract_plane(
            _cfg(model=str(bare), harmful=str(HARMFUL_FILE), harmless=str(HARMLESS_FILE), limit=N)
        )
    tpl = tmp_path / "template.jinja"
    tpl.write_text(template)
    res = extract_plane(
        _cfg(
            model=str(bare),
            harmful=str(HARMFUL_FILE),
            harmless=str(HARMLESS_FILE),
            limit=N,
            chat_template=str(tpl),
        )
    )
    _assert_orthonormal(res.plane)

    # The CLI turns these into one line on stderr and exit status 2.
    assert (
        main(
            [
                "--model",
                str(tiny_qwen2),
                "--harmful",
                str(empty),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "empty" in capsys.readouterr().err

    # An architecture rotserve has no site map for: the error lists the supported ones.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024)).eval()
    _, tok = loaded["qwen2"]
    with pytest.raises(
        UnsupportedArchitectureError,
        match="Qwen2ForCausalLM.*LlamaForCausalLM|LlamaForCausalLM.*Qwen2ForCausalLM",
    ):
        extract_from_loaded(gpt2, tok, _prompts(), _cfg())

    with pytest.raises(ExtractionError, match="holdout"):
        extract_from_loaded(gpt2, tok, _prompts(), _cfg(select="separability", holdout=0))
    with pytest.raises(ExtractionError, match="--random-b1"):
        _cfg(random_b1=True, second="pca").validate()


def test_help_documents_every_option():
    parser = build_parser("jobs/extract.py")
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.option_strings[0] in text
    for word in (
        "max_sim",
        "max_norm",
        "separability",
        "AUROC",
        "Cohen's d",
        "per-sample",
        "last-pcs",
        "IncrementalPCA",
        "(default: 16)",
        "(default: max_sim)",
    ):
        assert word in text, word
    args = parser.parse_args([])
    assert args.model.endswith("data/toy-refusal") and args.select == "max_sim"


def test_cli_defaults_are_the_config_defaults(monkeypatch, tmp_path):
    """No flags means ExtractConfig(): one copy of the defaults, data paths read at call time."""
    monkeypatch.setenv("ROTSERVE_DATA_DIR", str(tmp_path))
    cfg = config_from_args(build_parser().parse_args([]))
    assert cfg == ExtractConfig()
    assert cfg.model == str(tmp_path / "toy-refusal")
    assert cfg.harmful == str(tmp_path / "prompts" / "harmful.jsonl")
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap the long path
    assert f"(default: {tmp_path / 'toy-refusal'})" in build_parser().format_help()


def test_the_rule_registries_are_what_the_cli_offers_and_controls_iterate(monkeypatch):
    """One place per rule: --select's choices and help, the config check and --controls all
    read SELECT_RULES (--second's choices SECOND_METHODS), so a rule registered there shows up
    in each of them."""
    from rotserve.extract.first_axis import FirstAxis, SelectRule
    from rotserve.extract.pipeline import control_configs

    def choices(parser, dest):
        return next(a.choices for a in parser._actions if a.dest == dest)

    assert choices(build_parser(), "select") == list(SELECT_RULES)
    assert choices(build_parser(), "second") == list(SECOND_METHODS)
    cfg = ExtractConfig(select="max_sim", holdout=0.25)
    controls = [name for name in control_configs(cfg) if name.startswith("select-")]
    assert controls == [f"select-{r}".replace("_", "-") for r in SELECT_RULES if r != "max_sim"]
    # A rule that reads the held-out statistics is no control without held-out prompts.
    assert "select-separability" not in control_configs(ExtractConfig(holdout=0.0))

    def first_site(table, cands, usable):
        return FirstAxis(cands.d[usable[0]], usable[0], "the first usable site")

    monkeypatch.setitem(SELECT_RULES, "first_site", SelectRule(first_site, "the first\nsite"))
    parser = build_parser()
    assert "first_site" in choices(parser, "select")
    assert "  first_site    the first\n                site\n" in parser.format_help()
    assert config_from_args(parser.parse_args(["--select", "first_site"])).select == "first_site"
    ExtractConfig(select="first_site").validate()
    assert control_configs(cfg)["select-first-site"].select == "first_site"


def test_statistics_helpers():
    import numpy as np

    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert auroc(pos, neg) == 1.0 and auroc(neg, pos) == 0.0
    assert cohens_d(pos, neg) == pytest.approx(3.0)
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_separability_ties_are_broken_by_cohens_d():
    from rotserve.extract.candidates import Candidates, CandidateStat

    d = torch.eye(3, 8)
    cands = Candidates(r=d, d=d, means={})
    rows = [
        CandidateStat(f"s{i}", i, "resid_mid", i + 0.5, 1.0, 0.5, auroc=a, cohens_d=c)
        for i, (a, c) in enumerate([(1.0, 2.0), (1.0, 5.0), (0.9, 9.0)])
    ]
    assert select_first_axis("separability", rows, cands, [0, 1, 2]).index == 1


def test_per_sample_pca_streams_to_the_same_axis():
    """Chunked IncrementalPCA finds the axis a one-shot fit finds; b1 is projected out first."""
    from rotserve.extract.second_axis import PerSamplePCA

    g = torch.Generator().manual_seed(0)
    hidden, n = 32, 200
    b1, axis = torch.zeros(hidden), torch.zeros(hidden)
    b1[0], axis[1] = 1.0, 1.0
    means = {HARMFUL: torch.zeros(2, hidden), HARMLESS: torch.zeros(2, hidden)}
    means[HARMFUL][:, 0] = 1.0
    # Activations spread mostly along `axis`, a little along everything else.
    acts = 0.05 * torch.randn(n, 2, hidden, generator=g)
    acts += torch.randn(n, 1, 1, generator=g) * axis + 2.0 * b1
    axes = []
    for chunk in (8, 10_000):
        ps = PerSamplePCA(b1, means, [0, 1], n_components=2, chunk_rows=chunk)
        for start in range(0, n, 7):  # uneven batches
            ps.update(acts[start : start + 7], HARMFUL if start % 2 else HARMLESS)
        second = ps.finish()
        assert abs(float(second.b1 @ second.b2)) < 1e-6
        assert second.info["rows"] == 2 * n
        axes.append(second.b2)
    assert abs(float(axes[0] @ axis)) > 0.99 and abs(float(axes[1] @ axis)) > 0.99


def test_controls_are_written_beside_the_plane_from_the_same_statistics(
    tiny_qwen2, tmp_path, capsys
):
    """`extract --controls`: random b2, random b1+b2 and each other selection rule, named for
    one grid command. (~10 s: one extraction on the tiny model, 5 planes from its statistics)"""
    from rotserve.extract.cli import main as extract_main

    out = tmp_path / "plane.safetensors"
    args = ["--model", str(tiny_qwen2), "--harmful", str(HARMFUL_FILE)]
    args += ["--harmless", str(HARMLESS_FILE), "--limit", str(N), "--out", str(out)]
    assert extract_main([*args, "--controls", "--no-figure", "--quiet"]) == 0
    printed = capsys.readouterr().out
    main_plane = load_plane(out)
    names = ["random-b2", "random", "select-max-norm", "select-mean", "select-separability"]
    controls = {n: load_plane(tmp_path / f"plane.ctrl-{n}.safetensors") for n in names}
    assert f"--plane random-b2={tmp_path / 'plane.ctrl-random-b2.safetensors'}" in printed
    assert torch.equal(controls["random-b2"].b1, main_plane.b1)  # same b1, b2 random
    assert controls["random-b2"].meta.method["second"] == "random"
    assert controls["random"].meta.method["random_b1"] is True
    assert controls["select-mean"].meta.method["select"] == "mean"
    ids = {p.plane_id for p in controls.values()} | {main_plane.plane_id}
    assert len(ids) >= 5  # distinct planes (two rules may legitimately pick the same site)
