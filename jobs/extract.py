"""Extract a steering plane from activation statistics (no generation).

    python jobs/extract.py                      # toy model in data/toy-refusal, data/prompts
    python jobs/extract.py --model Qwen/Qwen2.5-7B-Instruct --harmful H.jsonl --harmless L.jsonl \
        --out plane.safetensors --device cuda --dtype bfloat16

Same options as `rotserve extract`; see `--help`.
"""

from rotserve.extract.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="jobs/extract.py"))
