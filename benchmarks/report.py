"""BENCHMARKS.md from the benchmark's JSON, keeping the hand-written interpretation.

The file is regenerated on every run; the text between the two INTERPRETATION markers is
read from the existing file first and written back unchanged, so the analysis written by a
person survives re-measuring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BEGIN = "<!-- interpretation:begin (kept when the file is regenerated) -->"
END = "<!-- interpretation:end -->"
# The heading of each benchmark's section and the summary-table metrics it measures: a run of
# only some benchmarks (--only) replaces just those in an existing file (write_markdown).
SECTION_TITLES = {  # in the order the runner runs them
    "rotation": "## 4. The rotation op alone",
    "extract": "## 5. Extraction",
    "steer": "## 1. Steering overhead",
    "distinct": "## 3. Distinct angles do not cost",
    "grid": "## 2. Grid throughput",
    "coherence": "## 6. Coherence and the start-up canary",
    "judge": "## 7. Judging a grid",
    "capability": "## 8. Capability at every setting",
}
SECTION_METRICS = {
    "steer": ("steer_overhead_ratio",),
    "grid": ("grid_speedup", "grid_vs_vllm_hooks"),
    "distinct": ("distinct_angles_ratio",),
    "rotation": ("rotation_vs_copy",),
    "extract": ("extract_prompts_per_s",),
    "coherence": ("coherence_throughput_ratio", "canary_s"),
    "judge": ("judge_ratio",),
    "capability": ("capability_ratio",),
}
DEFAULT_INTERPRETATION = (
    "_No interpretation written yet. Write it between the markers; `python jobs/bench.py` "
    "keeps it._"
)


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if isinstance(x, float | int) and not isinstance(x, bool):
        return format(x, spec)
    return str(x)


def existing_interpretation(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    return None


def headline_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, what is compared, value, target, met) rows of the summary table."""
    t = doc["targets"]
    d = doc["details"]
    rows = []

    def met(key: str) -> str:
        v = t.get(key, {}).get("met")
        return {True: "yes", False: "**no**", None: "-"}[v]

    st = d.get("steer_overhead", {})
    rows.append(
        (
            "`steer_overhead_ratio`",
            "rotserve engine, every layer, distinct angle per request / stock vLLM "
            f"(output tok/s: {_f(st.get('rotserve', {}).get('median_rate'), '.1f')} vs "
            f"{_f(st.get('stock', {}).get('median_rate'), '.1f')})",
            _f(doc.get("steer_overhead_ratio"), ".3f"),
            ">= 0.95",
            met("steer_overhead_ratio"),
        )
    )
    g = d.get("grid", {})
    rows.append(
        (
            "`grid_speedup`",
            f"{g.get('angles', '?')}-angle x {g.get('prompts', '?')}-prompt grid: rotserve, one "
            f"mixed-angle pass ({_f(g.get('rotserve', {}).get('median_rate'), '.1f')} tok/s) / "
            f"HF hooks, one pass per angle ({_f(g.get('hf', {}).get('median_rate'), '.1f')} "
            f"tok/s, {g.get('hf_best', {}).get('dtype', '?')}, batch "
            f"{g.get('hf_best', {}).get('batch_size', '?')})",
            _f(doc.get("grid_speedup"), ".1f"),
            ">= 10",
            met("grid_speedup"),
        )
    )
    last = (g.get("by_prompts") or [{}])[-1]
    if "vllm_hooks" in last:
        ag = g.get("agreement") or {}
        rows.append(
            (
                "`grid_vs_vllm_hooks`",
                f"{last['angles']}-angle x {last['prompts']}-prompt grid: rotserve "
                f"({last['rotserve']['median_rate']:.1f} tok/s) / stock vLLM, eager, rotation "
                "hooks on the norms, one engine-wide angle per call "
                f"({last['vllm_hooks']['median_rate']:.1f} tok/s); same tokens in float32: "
                f"{ag.get('identical_pairs', '?')}/{ag.get('pairs', '?')} (prompt, angle) pairs",
                _f(doc.get("grid_vs_vllm_hooks"), ".2f"),
                "-",
                "-",
            )
        )
    da = d.get("distinct_angles", {})
    rows.append(
        (
            "`distinct_angles_ratio`",
            f"{da.get('requests', '?')} distinct angles in one batch / one shared angle "
            f"({_f(da.get('distinct', {}).get('median_rate'), '.1f')} vs "
            f"{_f(da.get('shared', {}).get('median_rate'), '.1f')} tok/s)",
            _f(doc.get("distinct_angles_ratio"), ".3f"),
            ">= 0.98",
            met("distinct_angles_ratio"),
        )
    )
    ro = d.get("rotation_op", {})
    rows.append(
        (
            "`rotation_vs_copy`",
            "time of `rotation.rotate` (best of eager / torch.compile) / time of a clone of "
            f"the same [{ro.get('headline_shape', '?')}] tensor (worst dtype)",
            _f(doc.get("rotation_vs_copy"), ".2f"),
            "<= 2",
            met("rotation_vs_copy"),
        )
    )
    co = d.get("coherence", {})
    if co:
        rows.append(
            (
                "`coherence_throughput_ratio`",
                f"grid shard ({co['requests']} mixed-angle requests x {co['max_tokens']} tokens) "
                "with its nll/perplexity columns (one more batch of unsteered prefills) / "
                "without; the grid's default",
                _f(doc.get("coherence_throughput_ratio"), ".3f"),
                "-",
                "-",
            )
        )
        rows.append(
            (
                "`canary_s`",
                f"start-up canary on the same engine, median of {co['canary_runs']} runs "
                f"(engine start: {_f(co.get('engine_start_s'), '.1f')} s)",
                _f(doc.get("canary_s"), ".2f"),
                "<= 2",
                met("canary_s"),
            )
        )
    ex = d.get("extract", {})
    rows.append(
        (
            "`extract_prompts_per_s`",
            f"plane extraction, {ex.get('prompts', '?')} prompts, batch "
            f"{ex.get('batch_size', '?')}, {ex.get('dtype', '?')}; peak RSS "
            f"{_f((ex.get('peak_rss_bytes') or math.nan) / 2**30, '.2f')} GiB",
            _f(doc.get("extract_prompts_per_s"), ".2f"),
            "-",
            "-",
        )
    )
    ju = d.get("judge")
    if ju:
        rows.append(
            (
                "`judge_ratio`",
                f"{ju['rows']} rows judged through rotserve (guided choice, verdict table) / one "
                "plain vLLM generate of the same prompts, one token each, same engine "
                f"({_f(ju['rotserve']['median_rate'], '.1f')} vs "
                f"{_f(ju['plain']['median_rate'], '.1f')} rows/s)",
                _f(doc.get("judge_ratio"), ".3f"),
                ">= 0.8",
                met("judge_ratio"),
            )
        )
    ca = d.get("capability")
    if ca:
        rows.append(
            (
                "`capability_ratio`",
                f"{ca['task']} at {ca['settings']} settings: rotserve capability's mixed pass "
                f"({_f(ca['rotserve']['median_seconds'], '.1f')} s) / lm-eval local-completions "
                f"through rotserve serve, one model name at a time "
                f"({_f(ca['lm_eval']['median_seconds'], '.1f')} s; batched 32 per call: "
                f"{_f(ca['lm_eval_batched']['median_seconds'], '.1f')} s)",
                _f(doc.get("capability_ratio"), ".1f"),
                "-",
                "-",
            )
        )
    return rows


def render_markdown(doc: dict[str, Any], interpretation: str | None = None) -> str:
    m, v, s = doc["machine"], doc["versions"], doc["settings"]
    d = doc["details"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python jobs/bench.py"
        + (" --quick" if s.get("quick") else "")
        + "` (regenerate with the same command; raw numbers in "
        f"`{doc.get('json_path', 'bench/bench.json')}`). Every ratio compares contenders "
        "measured side by side in one process, alternating in rounds (A B, then B A) so that "
        "machine drift cancels; each ratio is the median of the per-round ratios.",
        "",
        f"- **Device**: {doc['device']} ({', '.join(m.get('cpu_flags') or [])}); no GPU; "
        + _bf16_note(m),
        f"- **Versions**: torch {v.get('torch')}, {v.get('vllm_distribution')} {v.get('vllm')}, "
        f"transformers {v.get('transformers')}, rotserve {v.get('rotserve')}, "
        f"Python {v.get('python')}",
        f"- **Run**: {doc.get('started')}, {_f(doc.get('wall_s'), '.0f')} s"
        f"{' (--quick)' if s.get('quick') else ''}; load average (1/5/15 min) at start "
        f"{doc.get('load', {}).get('start')}, at end {doc.get('load', {}).get('end')}",
        "",
        "| metric | compares | value | target | met | CPU bf16 |",
        "|---|---|---|---|---|---|",
    ]
    # The bf16 cell travels with its row: a partial rerun on another CPU replaces both.
    for row in headline_rows(doc):
        lines.append("| " + " | ".join((*row, _bf16_cell(m))) + " |")
    lines += ["", "## Models and settings", ""]
    for key, model in doc.get("models", {}).items():
        lines.append(
            f"- `{key}`: {model['name']} (random weights): hidden {model['hidden_size']}, "
            f"{model['num_layers']} layers, {model['num_heads']} heads / "
            f"{model['num_kv_heads']} KV heads (head size {model['head_dim']}), MLP "
            f"{model['intermediate_size']}, vocab {model['vocab_size']}, "
            f"{model['parameters'] / 1e6:.0f}M parameters"
        )
    eng = s.get("engine", {})
    lines += [
        f"- vLLM engines: dtype {eng.get('dtype')}, "
        f"{'eager' if eng.get('enforce_eager') else 'torch.compile (vLLM default)'}, prefix "
        f"caching off, max_model_len {eng.get('max_model_len')}, KV cache "
        f"{eng.get('kv_cache_gib')} GiB each, greedy, `ignore_eos` (every request generates "
        "exactly its max_tokens); worker threads on every core "
        f"({d.get('engines', {}).get('binding', 'see JSON')})",
        f"- Engines alive together: {d.get('engines', {}).get('alive_together')}; start times "
        f"{d.get('engines', {}).get('start_s')} s; CPU used by idle engines: "
        f"{_f(d.get('engines', {}).get('idle_cpu_percent'), '.1f')} % of one core",
    ]
    lines += _section_lines(doc)
    lines += [
        "",
        "## Interpretation",
        "",
        BEGIN,
        (interpretation if interpretation is not None else DEFAULT_INTERPRETATION),
        END,
        "",
    ]
    return "\n".join(lines)


def _noise_line(sec: dict[str, Any]) -> str:
    ext = sec.get("external_cores_per_round") or []
    if not ext:
        return ""
    dropped = len(sec.get("discarded_rounds") or [])
    return (
        f" Other processes used {min(ext):.2f}-{max(ext):.2f} cores during the kept rounds; "
        f"{dropped} round(s) discarded and re-run because others used more than "
        f"{sec.get('max_external_cores', 0.3)} cores."
    )


def _roofline_lines(g: dict[str, Any]) -> list[str]:
    """The grid's contenders against the machine's matmul peak (benchmarks/roofline.py)."""
    peak = g.get("matmul_peak")
    if not peak:
        return []
    rows = "; ".join(f"{n} rows: {t:.3f}" for n, t in peak["tflops_by_rows"].items())
    out = [
        "",
        f"Roofline: the model's MLP matmuls alone run at up to {peak['peak_tflops']:.3f} TFLOP/s "
        f"({peak['dtype']}, {peak['threads']} threads; {rows}). Every contender pushes the same "
        "tokens through the same linear layers (every prompt once per angle, every reply "
        "token), so the baseline's achieved rate bounds what any engine can gain over it: "
        "ceiling = peak / HF's achieved rate.",
        "",
        "| N prompts | tokens through the model | rotserve TFLOP/s (share of peak) | "
        "stock vLLM + hooks TFLOP/s (share) | HF TFLOP/s (share) | rotserve / HF | ceiling |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(rf: dict[str, Any], name: str) -> str:
        a, sh = rf["achieved_tflops"], rf["share_of_peak"]
        return f"{a[name]:.3f} ({sh[name]:.0%})" if name in a else "-"

    for r in g.get("by_prompts", [g]):
        rf = r.get("roofline")
        if not rf:
            continue
        out.append(
            f"| {r['prompts']} | {rf['tokens_processed_per_grid']} | {cell(rf, 'rotserve')} | "
            f"{cell(rf, 'vllm_hooks')} | {cell(rf, 'hf')} | "
            + (f"{r['speedup']:.1f}x" if "speedup" in r else "-")
            + " | "
            + (f"{rf['speedup_ceiling']:.1f}x" if "speedup_ceiling" in rf else "-")
            + " |"
        )
    return out


def _partial_lines(doc: dict[str, Any], section: str) -> list[str]:
    """Provenance of a section measured by a run of only some benchmarks (--only)."""
    s = doc["settings"]
    if set(s.get("sections") or ()) >= set(SECTION_TITLES):
        return []
    load = doc.get("load", {})
    cmd = "python jobs/bench.py" + (" --quick" if s.get("quick") else "")
    cmd += " --only " + " ".join(s["sections"])
    models = "; ".join(
        f"`{m['name']}`: hidden {m['hidden_size']}, {m['num_layers']} layers, vocab "
        f"{m['vocab_size']}, {m['parameters'] / 1e6:.0f}M parameters"
        for m in doc.get("models", {}).values()
    )
    v = doc["versions"]
    return [
        f"_Measured by a separate run, `{cmd}`, started {doc.get('started')}, "
        f"{_f(doc.get('wall_s'), '.0f')} s; load average (1/5/15 min) at start "
        f"{load.get('start')}, at end {load.get('end')}; {models}; torch {v.get('torch')}, "
        f"{v.get('vllm_distribution')} {v.get('vllm')}. The other sections of this file come "
        "from the run described at the top._",
        "",
    ]


def _grid_lines(g: dict[str, Any]) -> list[str]:
    grids = g.get("by_prompts", [g])
    hf_ns = [r["prompts"] for r in grids if "hf" in r]
    hooks = "vllm_hooks" in grids[-1]
    out = [
        f"{g['angles']} angles x N prompts x {g['max_tokens']} tokens on `{g['model']}`. "
        "rotserve sends the whole grid as one mixed-angle batch. The reference method makes a "
        "grid one angle at a time"
        + (
            ", two ways, both measured: **stock vLLM + hooks**, a stock vLLM engine (no rotserve "
            "class), eager, its engine core in this process so that PyTorch forward hooks on "
            "every decoder layer's `input_layernorm` and `post_attention_layernorm` rotate the "
            "normed output with `rotation.rotate`; one engine-wide angle, set between calls; a "
            "Python loop over the angles, every prompt in each call; and **HF**"
            if hooks
            else ": HF"
        )
        + " `generate` with rotation hooks, one pass per angle (HFRotatedGenerator), at the "
        "dtype and batch size that a probe (one angle's pass, each setting) found fastest"
        + (f", with {g['hf_threads']} torch threads" if "hf_threads" in g else "")
        + (f", run for N <= {max(hf_ns)}" if hf_ns else "")
        + ". `grid_speedup` is the largest N HF ran at"
        + ("; `grid_vs_vllm_hooks` the largest N." if hooks else "."),
    ]
    ag = g.get("agreement")
    if ag:
        out += [
            "",
            f"Same work, same tokens: before timing, both vLLM paths ran {ag['angles']} angles x "
            f"{ag['prompts']} prompts x {ag['tokens']} tokens in {ag['dtype']} (rotserve "
            f"eager): {ag['identical_pairs']}/{ag['pairs']} (prompt, angle) pairs gave identical "
            f"tokens (first token: {ag['first_token_agreement']:.3f}; max first-token |logprob "
            f"difference| {_f(ag['max_first_logprob_diff'], '.2g')}; required: "
            f"{ag['threshold']:.0%} of pairs). Steering changed the tokens of "
            f"{ag['steering_changes']:.0%} of the pairs against the same engine with its hooks "
            "passing through, so hooks that steered differently from rotserve would show. The "
            f"hooks ran {ag['hook_calls']} times (counted on every call: vLLM's norms went "
            "through the hooked modules).",
        ]
    eng = g.get("vllm_hooks_engine") or {}
    if eng:
        out += [
            "",
            f"The hooked engine: {eng['dtype']}, eager, in-process, {eng['hooked_modules']} "
            f"hooked norms, torch threads {eng['torch_threads']}, started in {eng['start_s']} s; "
            f"rotserve's engine: {eng.get('rotserve_engine', '?')}.",
        ]
    out += [
        "",
        "| N prompts | output tokens | rotserve tok/s | stock vLLM + hooks tok/s | rotserve / "
        "hooks | HF tok/s (best setting) | rotserve / HF | HF probe (tok/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in grids:
        probe = "; ".join(
            f"{t['dtype']} b{t['batch_size']}: {t['tokens_per_s']:.1f}"
            for t in r.get("hf_probe", [])
        )
        vh = r.get("vllm_hooks")
        hf = r.get("hf")
        out.append(
            f"| {r['prompts']} | {r['tokens_per_grid']} | {r['rotserve']['median_rate']:.1f} | "
            + (f"{vh['median_rate']:.1f} | {r['speedup_vs_vllm_hooks']:.2f}x" if vh else "- | -")
            + " | "
            + (
                f"{hf['median_rate']:.1f} ({r['hf_best']['dtype']}, batch "
                f"{r['hf_best']['batch_size']}) | {r['speedup']:.1f}x | {probe or '-'}"
                if hf
                else "not run | - | -"
            )
            + " |"
        )
    per_round = []
    for r in grids:
        parts = []
        if "paired_ratios_vs_vllm_hooks" in r:
            parts.append(
                "vs hooks " + ", ".join(f"{x:.2f}" for x in r["paired_ratios_vs_vllm_hooks"])
            )
        if "paired_ratios" in r:
            parts.append("vs HF " + ", ".join(f"{x:.1f}" for x in r["paired_ratios"]))
        per_round.append(f"N={r['prompts']}: " + "; ".join(parts))
    merged = {
        "external_cores_per_round": [
            x for r in grids for x in (r.get("external_cores_per_round") or [])
        ],
        "discarded_rounds": [x for r in grids for x in (r.get("discarded_rounds") or [])],
    }
    out += ["", "Per-round ratios: " + " | ".join(per_round) + "." + _noise_line(merged)]
    shares = [
        f"N={r['prompts']}: {r['chat_template_s_per_grid']:.3f} s per grid, "
        + ", ".join(
            f"{v:.2%} of {'rotserve' if k == 'rotserve' else 'the hooked engine'}'s time"
            for k, v in r["chat_template_share"].items()
        )
        for r in grids
        if "chat_template_s_per_grid" in r
    ]
    if shares:
        out += [
            "",
            "`RotServeEngine.generate` applies the chat template to every prompt on every call "
            "(rotserve and the hooked engine alike; HF's prompts are templated once): "
            + "; ".join(shares)
            + ".",
        ]
    return out + _roofline_lines(g)


def _section_lines(doc: dict[str, Any]) -> list[str]:
    d = doc["details"]
    out: list[str] = []
    st = d.get("steer_overhead")
    if st:
        out += [
            "",
            "## 1. Steering overhead",
            "",
            *_partial_lines(doc, "steer"),
            f"{st['requests']} requests (prompts of {st['prompt_tokens_min']}-"
            f"{st['prompt_tokens_max']} tokens) x {st['max_tokens']} output tokens per round, "
            f"{st['rounds']} rounds; rotserve rotates both norm outputs of all "
            f"{st['layers']} layers, a different angle per request (plain mask, every token).",
            "",
            "| contender | median tok/s | min | max |",
            "|---|---|---|---|",
        ]
        for name in ("stock", "rotserve"):
            r = st[name]
            out.append(
                f"| {name} | {r['median_rate']:.1f} | {r['min_rate']:.1f} | {r['max_rate']:.1f} |"
            )
        out.append("")
        out.append(f"Per-round ratios: {', '.join(f'{x:.3f}' for x in st['paired_ratios'])}.")
    g = d.get("grid")
    if g:
        out += ["", "## 2. Grid throughput", ""] + _partial_lines(doc, "grid") + _grid_lines(g)
    da = d.get("distinct_angles")
    if da:
        out += [
            "",
            "## 3. Distinct angles do not cost",
            "",
            *_partial_lines(doc, "distinct"),
            f"{da['requests']} requests x {da['max_tokens']} tokens on the rotserve engine: "
            f"{da['requests']} distinct angles vs one shared angle ({da['shared_angle']} deg), "
            f"{da['rounds']} rounds. Per-round ratios: "
            f"{', '.join(f'{x:.3f}' for x in da['paired_ratios'])}." + _noise_line(da),
        ]
    ro = d.get("rotation_op")
    if ro:
        out += [
            "",
            "## 4. The rotation op alone",
            "",
            *_partial_lines(doc, "rotation"),
            "Measured in a child process with glibc's malloc pinned "
            f"(`GLIBC_TUNABLES={ro.get('glibc_tunables', '?')}`: freed tensors up to 32 MiB "
            "are reused instead of being unmapped and page-faulted back, as tcmalloc would do), "
            f"torch {ro['threads']} threads; each number is the median call of a block, median "
            f"of {ro['rounds']} alternating rounds. Effective bandwidth counts the floor (one "
            "read + one write of the activations); `x copy` is time / time of `h.clone()`. "
            "`rotate` is `rotserve.rotation.rotate` as shipped; `rotate_matmul` the same "
            "semantics written with two matmuls (checked against it, benchmarks/"
            "rotation_op.py); `rmsnorm_compiled` is the norm each steered site already runs, "
            "for scale. Standalone compiled calls include torch.compile's Python entry "
            "(~20 us), which does not exist inside vLLM's compiled graph: see the in-graph "
            "table below.",
            "",
            "| shape | dtype | variant | us/call | GB/s | x copy |",
            "|---|---|---|---|---|---|",
        ]
        for c in ro["cases"]:
            for name, vv in c["variants"].items():
                out.append(
                    f"| {c['tokens']}x{c['hidden']} | {c['dtype']} | {name} | "
                    f"{vv['us_per_call']:.1f} | {vv['effective_GBps']:.2f} | "
                    f"{vv['vs_copy']:.2f} |"
                )
        if ro.get("in_graph"):
            out += [
                "",
                "In graph: one compiled stack of RMSNorm sites, each followed by the rotation or "
                "not. The extra columns are (time with rotation - time without) / sites: what "
                "steering one site adds inside a compiled forward (already a difference, not a "
                "total).",
                "",
                "| tokens | dtype | sites | RMSNorm alone, us/site | extra for `rotate`, us/site "
                "| extra for `rotate_matmul`, us/site |",
                "|---|---|---|---|---|---|",
            ]
            for g in ro["in_graph"]:
                out.append(
                    f"| {g['tokens']} | {g['dtype']} | {g['sites']} | "
                    f"{g['norm_us_per_site']:.1f} | {g['rotate_us_per_site']:.1f} | "
                    f"{g['rotate_matmul_us_per_site']:.1f} |"
                )
    co = d.get("coherence")
    if co:
        out += [
            "",
            "## 6. Coherence and the start-up canary",
            "",
            *_partial_lines(doc, "coherence"),
            f"One grid shard, {co['requests']} requests at distinct angles x {co['max_tokens']} "
            f"tokens, on the rotserve engine, {co['rounds']} rounds: generation alone vs "
            "generation plus coherence (each generation re-read by the unsteered model as one "
            "batch of prefills, vLLM prompt log-probs). Throughput keeps "
            f"{co['ratio']:.3f} of itself, i.e. coherence adds "
            f"{(1 / co['ratio'] - 1) * 100:.0f}% to a shard's wall time. Per-round ratios: "
            f"{', '.join(f'{x:.3f}' for x in co['paired_ratios'])}." + _noise_line(co),
            "",
            f"The start-up canary (three tiny calls: a mixed batch, each request alone, the "
            f"steered and unsteered re-runs), {co['canary_runs']} runs on the same engine: "
            f"median {co['canary_s']:.2f} s, max {co['canary_max_s']:.2f} s, against an "
            f"engine start of {_f(co.get('engine_start_s'), '.1f')} s.",
        ]
    ex = d.get("extract")
    if ex:
        out += [
            "",
            "## 5. Extraction",
            "",
            *_partial_lines(doc, "extract"),
            f"`extract_from_loaded` on `{ex['model']}` in a child process: {ex['harmful']} "
            f"harmful + {ex['harmless']} harmless prompts (data/prompts), select "
            f"{ex['select']}, second {ex['second']}, hold-out {ex['holdout']}, batch "
            f"{ex['batch_size']}, {ex['dtype']}, {ex['threads']} threads: "
            f"{ex['extract_s']:.1f} s ({ex['prompts_per_s']:.2f} prompts/s; model load "
            f"{ex['model_load_s']:.1f} s not included). RSS: "
            f"{ex['rss_start_bytes'] / 2**30:.2f} GiB after imports, "
            f"{ex['rss_after_model_load_bytes'] / 2**30:.2f} GiB with the model loaded, peak "
            f"{ex['peak_rss_bytes'] / 2**30:.2f} GiB (the safetensors weights are memory-mapped, "
            "so they count only once a forward pass touches them).",
        ]
        for r in ex.get("by_dtype", [])[1:]:
            out += [
                "",
                f"With `--dtype {r['dtype']}`: {r['extract_s']:.1f} s "
                f"({r['prompts_per_s']:.2f} prompts/s), peak RSS "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB.",
            ]
    ju = d.get("judge")
    if ju:
        out += [
            "",
            "## 7. Judging a grid",
            "",
            *_partial_lines(doc, "judge"),
            f"{ju['rows']} rows (judge prompts of {ju['prompt_tokens_min']}-"
            f"{ju['prompt_tokens_max']} tokens) on one engine of {ju['judge']}, prefix caching "
            f"off, {ju['rounds']} rounds: rotserve's judge shard (guided choice over the "
            f"{ju['rubric']} labels, verdicts as an Arrow table) vs a plain `llm.generate` of "
            "the same prompt token ids, one greedy token each. Rows/s:",
            "",
            "| contender | median rows/s | min | max |",
            "|---|---|---|---|",
        ]
        for name in ("plain", "rotserve"):
            r = ju[name]
            out.append(
                f"| {name} | {r['median_rate']:.1f} | {r['min_rate']:.1f} | {r['max_rate']:.1f} |"
            )
        out += [
            "",
            f"Per-round ratios: {', '.join(f'{x:.3f}' for x in ju['paired_ratios'])}; "
            f"verdicts {ju['labels']}; the labels given are "
            f"{', '.join(f'{k} {v}' for k, v in ju.get('label_tokens', {}).items())} tokens "
            "long in the judge's vocabulary, and a guided choice decodes each of them plus the "
            "EOS where the plain contender decodes one token: on a 2-layer judge those decode "
            "steps, not the prefill, set the time: the worst case for the ratio (a real judge "
            "answers a token or two after a prefill of hundreds of tokens on a 8-13B model)."
            + _noise_line(ju),
        ]
    ca = d.get("capability")
    if ca:
        out += ["", SECTION_TITLES["capability"], "", *_partial_lines(doc, "capability")]
        out += _capability_lines(ca)
    return out


def _capability_lines(ca: dict[str, Any]) -> list[str]:
    n, p = ca["settings"], ca["grid_prompts"]
    out = [
        f"lm-eval task `{ca['task']}` ({ca['requests']} log-likelihood requests) at {n} settings "
        f"(the baseline and {n - 1} angles, plain mask) on `{ca['model']}`, rounds: "
        f"{ca['rounds']}, every contender scoring every setting with lm-eval's metric code. **rotserve**: "
        "what `rotserve capability` does once its engine is up: lm-eval builds the requests "
        "once, one engine answers all (request, setting) pairs in mixed batches, lm-eval "
        "scores each setting. **lm_eval**: lm-eval's `local-completions` against `rotserve "
        "serve`, one evaluation per setting by model name (MODEL@θ), its defaults (one request "
        "per HTTP call); **lm_eval_batched**: the same, 32 requests per call. **grid**: a grid "
        f"shard of {p} prompts at the same {n} settings ({ca['grid_rows']} rows, 32 tokens, "
        "coherence on) on rotserve's engine, for scale. Both engines (rotserve's and the "
        f"server's, started together) were up after {ca['engines_up_s']} s, before any "
        "timing; prefix caching off on both.",
        "",
        "| contender | median s per pass | per round (s) |",
        "|---|---|---|",
    ]
    for name in ("rotserve", "lm_eval", "lm_eval_batched", "grid"):
        r = ca[name]
        per_round = ", ".join(f"{r['work_per_run'] / x:.1f}" for x in r["rates"])
        out.append(f"| {name} | {r['median_seconds']:.1f} | {per_round} |")
    out += [
        "",
        f"rotserve / lm_eval: {ca['ratio']:.1f}x (per round: "
        f"{', '.join(f'{x:.1f}' for x in ca['paired_ratios'])}); rotserve / lm_eval_batched: "
        f"{ca['ratio_vs_batched']:.1f}x. The capability pass takes {ca['vs_grid']:.2f} of the "
        f"time of the {p}-prompt grid shard at the same settings. lm-eval's score equals "
        "rotserve's at "
        + ", ".join(f"{k}: {v}/{n}" for k, v in ca["same_scores"].items())
        + " settings."
        + _noise_line(ca),
    ]
    return out


def _blocks(text: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Split a report into its preamble, its "## " sections by heading, and their order."""
    pre: list[str] = []
    blocks: dict[str, list[str]] = {}
    order: list[str] = []
    current = pre
    for line in text.split("\n"):
        if line.startswith("## "):
            current = blocks.setdefault(line, [])
            order.append(line)
        current.append(line)
    return pre, blocks, order


def _metric(line: str) -> str | None:
    if line.startswith("| `"):
        return line.split("`", 2)[1]
    return None


def merge_partial(old: str, new: str, sections: set[str]) -> str:
    """`old` with the sections in `sections` (and their summary-table rows) taken from `new`.

    Everything else of `old` stays as it was: its header (which describes the run that
    measured the rest), the other sections and the interpretation.
    """
    old_pre, old_blocks, old_order = _blocks(old)
    new_pre, new_blocks, _ = _blocks(new)
    replaced = {SECTION_METRICS[x] for x in sections}
    take = {m for ms in replaced for m in ms}
    new_rows = {_metric(ln): ln for ln in new_pre if _metric(ln)}
    old_rows = {_metric(ln): ln for ln in old_pre if _metric(ln)}
    # The table in canonical order: a replaced metric's new row, every other metric's old one.
    canonical = [m for ms in SECTION_METRICS.values() for m in ms]
    rows = [
        (new_rows if m in take else old_rows)[m]
        for m in canonical
        if m in (new_rows if m in take else old_rows)
    ]
    pre: list[str] = []
    for line in old_pre:
        if _metric(line):
            if rows:
                pre += rows
                rows = []
            continue
        pre.append(line)
    titles = {SECTION_TITLES[x] for x in sections}
    order = list(old_order)
    for title in sorted(titles - set(old_order)):  # a section the old file did not have
        if title in new_blocks:
            order.insert(
                order.index("## Interpretation") if "## Interpretation" in order else len(order),
                title,
            )
    lines = pre
    for title in order:
        lines += new_blocks[title] if title in titles and title in new_blocks else old_blocks[title]
    return "\n".join(lines)


def write_markdown(doc: dict[str, Any], path: Path) -> Path:
    """Regenerate path; a run of only some benchmarks replaces just their sections."""
    interp = existing_interpretation(path)
    text = render_markdown(doc, interp)
    sections = set(doc["settings"].get("sections") or SECTION_TITLES)
    if sections < set(SECTION_TITLES) and interp is not None:
        text = merge_partial(path.read_text(encoding="utf-8"), text, sections)
    path.write_text(text, encoding="utf-8")
    return path


def _bf16_cell(machine: dict[str, Any]) -> str:
    """The summary table's CPU bf16 column: every ratio says what kind of CPU made it."""
    native = machine.get("native_bf16")
    if native is None:
        return "not recorded"
    return "native" if native else "none (bf16 ~5x slower)"


def _bf16_note(machine: dict[str, Any]) -> str:
    """Native bf16 or not: it decides what `--dtype auto` runs and how fast bf16 rows are."""
    native = machine.get("native_bf16")
    if native is None:  # results written before the field existed
        return "bf16 capability not recorded"
    if native:
        return "native bf16 (`--dtype auto` runs bfloat16)"
    return "no native bf16 (`--dtype auto` runs float32; bfloat16 rows run several times slower)"
