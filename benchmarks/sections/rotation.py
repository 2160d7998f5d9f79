"""The rotation op alone against a copy of the same activations: benchmarks.rotation_op, run in
a child process with pinned malloc settings."""

from __future__ import annotations

from benchmarks.sections.common import Context


def run(ctx: Context) -> None:
    # Here, not at the top: rotation_op imports torch, which only its child process needs.
    from benchmarks.rotation_op import run_in_child

    s = ctx.settings
    ctx.log("rotation op vs copy (child process)")
    res = run_in_child(
        {
            "shapes": [list(x) for x in s.rotation_shapes],
            "rounds": s.rotation_rounds,
            "compile_variants": s.rotation_compile,
            "in_graph_tokens": list(s.rotation_in_graph_tokens),
            "in_graph_sites": s.rotation_in_graph_sites,
        },
        ctx.log,
    )
    head = s.rotation_shapes[0]
    cases = [c for c in res["cases"] if (c["tokens"], c["hidden"]) == head]
    res["headline_shape"] = f"{head[0]}x{head[1]}"
    res["rotation_vs_copy"] = max(c["best_shipped_vs_copy"] for c in cases)
    res["any_form_vs_copy"] = max(c["best_vs_copy"] for c in cases)
    ctx.details["rotation_op"] = res
