"""lm-evaluation-harness on rotserve's side: load tasks, record their requests once, score answers
per setting with lm-eval's own metric code. The only module that imports lm_eval.

Two passes of lm-eval's `evaluate()`, each with a model class of ours:

- RecordingLM answers nothing: it turns every request lm-eval builds into an engine request
  (token ids, as lm-eval's `local-completions` model would send them to a server) and remembers
  which lm-eval request (task, document, choice) it serves;
- ReplayLM, once per setting, returns the engine's answers at that setting, looked up by the
  request's content, so lm-eval's filters, metrics, aggregation and stderr score them.

Tokenization, truncation and generation settings follow lm-eval's `local-completions` with
`tokenizer_backend=huggingface` (its TemplateAPI): context and continuation are encoded
together and split as lm-eval splits them, no special tokens are added, an empty context is
the BOS (else EOS) token, inputs are left-truncated to `max_length - 1` tokens, a generation's
stop strings are the task's `until` plus the EOS string, its budget `max_gen_toks` (256 if the
task sets none), temperature 0 unless the task sets one, seed 1234. So a score here is the
score lm-eval reports for the same model served by `rotserve serve` at that steering.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rotserve.capability.plan import GENERATE, LOGLIKELIHOOD, EngineRequest

MAX_GEN_TOKS = 256  # lm-eval's TemplateAPI default when a task sets no max_gen_toks
API_SEED = 1234  # the seed lm-eval's API models send with every request
DEFAULT_MAX_LENGTH = 2048  # lm-eval's TemplateAPI default (capped at the model's positions)
# Generation arguments a task may set beyond until/max_gen_toks/temperature/do_sample that the
# completions API (and so vLLM's SamplingParams) understands; others are ignored, as vLLM's
# server ignores unknown request fields.
SAMPLING_EXTRAS = (
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "seed",
)
ROLLING = "loglikelihood_rolling"


class TaskError(ValueError):
    """A task that cannot be loaded or run; the message names it and what to do."""


@dataclass(frozen=True)
class EvalOptions:
    """What changes the requests lm-eval builds, and how it scores them."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    max_length: int = DEFAULT_MAX_LENGTH  # lm-eval's max_length (inputs get max_length - 1)
    bootstrap_iters: int = 100000  # lm-eval's default, for metrics without a closed-form stderr
    verbose: bool = False  # lm-eval's own logging and progress bars


@dataclass
class LoadedTasks:
    """lm-eval's loaded task dict, and what the manifest records of it."""

    names: tuple[str, ...]
    task_dict: Any  # lm_eval.tasks.manager.TaskDict
    include_paths: tuple[str, ...]
    configs: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> dict[str, Any]:
        return self.task_dict["tasks"]

    def fingerprint(self) -> str:
        """A hash of every loaded task's config (what the scores depend on besides answers)."""
        blob = json.dumps(self.configs, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def import_lm_eval() -> None:
    """TaskError with the install line when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError(
            "lm-evaluation-harness is not installed: pip install 'rotserve[eval]' (or "
            "pip install lm_eval)"
        ) from None


# --- loading ---------------------------------------------------------------------------------


def check_task_files(include_paths: Sequence[str]) -> None:
    """TaskError naming the first task YAML under an include path that does not parse.

    lm-eval's task index skips such a file silently, and the task is then "unknown"; naming the
    file and the parser's message is what the user needs."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for raw in include_paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise TaskError(f"--include-path {raw}: no such file or directory")
        files = [root] if root.is_file() else sorted(root.rglob("*.y*ml"))
        for path in files:
            if path.suffix not in (".yaml", ".yml"):
                continue
            try:
                load_yaml(path, resolve_func=False, recursive=True)
            except Exception as e:  # yaml.YAMLError, a broken include, an unreadable file
                reason = " ".join(str(e).split())
                raise TaskError(
                    f"task file {path} does not parse: {reason}; fix it or move it out of "
                    f"--include-path {raw}"
                ) from None


def load_tasks(names: Sequence[str], include_paths: Sequence[str]) -> LoadedTasks:
    """Load lm-eval tasks (names of tasks, groups or tags) from include paths and lm-eval's own.

    Raises TaskError for a file that does not parse, an unknown name (with close matches) or a
    task whose dataset cannot be loaded. Tasks found under the include paths alone are loaded
    without indexing lm-eval's thousands of built-in task files (seconds saved per run)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    names, paths = tuple(names), tuple(str(Path(p).expanduser()) for p in include_paths)
    if not names:
        raise TaskError("no tasks: give --tasks NAME[,NAME...]")
    check_task_files(paths)
    with quiet_lm_eval():
        manager = TaskManager(include_path=list(paths), include_defaults=False) if paths else None
        if manager is None or any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=list(paths) or None)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise TaskError(_unknown_tasks(unknown, manager.all_tasks, paths))
        try:
            task_dict = manager.load(list(names))
        except Exception as e:  # a dataset that cannot be read, a !function that does not import
            raise TaskError(_load_error(names, e)) from None
    tasks = task_dict["tasks"]
    if not tasks:
        raise TaskError(f"--tasks {','.join(names)}: names no task with documents")
    configs = {name: _plain(task.dump_config()) for name, task in sorted(tasks.items())}
    versions = {name: getattr(task, "VERSION", None) for name, task in sorted(tasks.items())}
    return LoadedTasks(names, task_dict, paths, configs, versions)


def _unknown_tasks(unknown: list[str], known: list[str], paths: tuple[str, ...]) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"--include-path {', '.join(paths)} or " if paths else ""
    return (
        f"unknown task {'; '.join(hints)}: not in {where}lm-eval's tasks. A task is an lm-eval "
        "task name (e.g. tinyMMLU, arc_easy) or the `task:` name in a YAML file under "
        "--include-path DIR (rotserve ships data/tasks: toy_reply_mc, toy_reply_gen)"
    )


def _load_error(names: Sequence[str], e: Exception) -> str:
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:600]
    hint = ""
    if isinstance(e, FileNotFoundError) or "data_files" in reason or "Unable to find" in reason:
        hint = (
            "; a relative dataset_kwargs.data_files path is read from the current directory, "
            "as lm-eval reads it: run from the directory it is relative to, or make it absolute"
        )
    elif "offline" in reason.lower() or "connect" in reason.lower():
        hint = "; a hub dataset needs the network (or a copy in the HF datasets cache)"
    return f"--tasks {','.join(names)}: lm-eval could not load them: {reason}{hint}"


def _plain(value: Any) -> Any:
    """A JSON-able copy of a task config (functions and other objects as their repr)."""
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "__name__", repr(o))))


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool = False) -> Iterator[None]:
    """lm-eval logs every step at INFO and draws a bar per task per pass; a capability run makes
    one pass per setting, so both are muted unless verbose (warnings still show)."""
    if verbose:
        yield
        return
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    original = task_module.tqdm
    task_module.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original
        logger.setLevel(level)


# --- the two model classes --------------------------------------------------------------------


def instance_key(request_type: str, args: Sequence[Any]) -> str:
    """The key of an lm-eval request by its content: the same in the recording and every
    replay pass (lm-eval rebuilds its requests in each)."""
    blob = json.dumps([request_type, list(args)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _lm_classes() -> tuple[type, type]:
    """The two LM subclasses, defined on first use so that importing this module does not
    import lm-eval (the driver checks for it first and says how to install it)."""
    from lm_eval.api.model import LM, TemplateLM
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ChatTemplate:
        """What lm-eval asks of a model with --apply_chat_template (as TemplateAPI does it)."""

        tokenizer: Any

        @property
        def tokenizer_name(self) -> str:
            return str(self.tokenizer.name_or_path).replace("/", "__")

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

    class RecordingLM(ChatTemplate, TemplateLM):
        """Turns each lm-eval request into engine requests; answers placeholders."""

        def __init__(self, tokenizer: Any, max_length: int) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length - 1  # lm-eval keeps one position for a generated token
            self.eos_string = tokenizer.eos_token
            self.requests: dict[str, EngineRequest] = {}  # engine key -> request, in order
            self.items: list[dict[str, Any]] = []
            self.ignored: set[str] = set()  # generation arguments the engine does not take
            self._encoded: dict[str, list[int]] = {}

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(
            self, string: str, add_special_tokens: bool | None = None, **kw
        ) -> list[int]:
            if string not in self._encoded:  # the same context comes once per choice
                ids = self.tokenizer(string, add_special_tokens=False).input_ids
                self._encoded[string] = list(ids)
            return list(self._encoded[string])

        def _record(self, inst: Any, requests: list[EngineRequest]) -> None:
            for r in requests:
                self.requests.setdefault(r.key, r)
            self.items.append(
                {
                    "task": inst.task_name,
                    "doc_id": int(inst.doc_id),
                    "idx": int(inst.idx),
                    "request_type": inst.request_type,
                    "instance_key": instance_key(inst.request_type, inst.args),
                    "request_keys": [r.key for r in requests],
                }
            )

        def _scored(self, context_enc: list[int], continuation_enc: list[int]) -> EngineRequest:
            # As lm-eval's TemplateAPI.batch_loglikelihood_requests: left-truncate the input.
            inp = (context_enc + continuation_enc)[-self.max_length :]
            ctxlen = len(context_enc) - max(
                0, len(context_enc) + len(continuation_enc) - self.max_length
            )
            return EngineRequest.of(LOGLIKELIHOOD, inp, n_continuation=len(inp) - ctxlen)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            for inst in requests:
                context, continuation = inst.args
                if context == "":
                    cont = self.tok_encode(continuation)
                    ctx, cont = (
                        ([self.prefix_token_id], cont)
                        if self.prefix_token_id != cont[0]
                        else (cont[:1], cont[1:])
                    )
                else:
                    ctx, cont = self._encode_pair(context, continuation)
                self._record(inst, [self._scored(ctx, cont)])
            return [(0.0, False)] * len(requests)

        def _loglikelihood_tokens(self, requests: list, **kw: Any) -> list:
            raise NotImplementedError  # loglikelihood records directly

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            for inst in requests:
                (string,) = inst.args
                windows = map(
                    make_disjoint_window,
                    get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1,
                        context_len=1,
                    ),
                )
                self._record(inst, [self._scored(c, t) for c, t in windows])
            return [0.0] * len(requests)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            for inst in requests:
                context, gen_kwargs = inst.args[0], inst.args[1]
                # As local-completions: the budget decides how much context is kept ...
                budget = gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS)
                tokens = self.tok_encode(context)[-(self.max_length - budget) :]
                # ... and its payload: max_tokens, temperature (0 unless set), stop, seed.
                kw = copy.deepcopy(gen_kwargs)
                kw.pop("do_sample", False)
                max_tokens = (
                    kw.pop("max_tokens")
                    if "max_tokens" in kw
                    else kw.pop("max_gen_toks", MAX_GEN_TOKS)
                )
                sampling = {
                    "max_tokens": int(max_tokens),
                    "temperature": float(kw.pop("temperature", 0)),
                    "stop": tuple(handle_stop_sequences(kw.pop("until", None), self.eos_string)),
                    "seed": API_SEED,
                }
                for name, value in kw.items():
                    if name in SAMPLING_EXTRAS:
                        sampling[name] = value
                    else:
                        self.ignored.add(name)
                self._record(inst, [EngineRequest.of(GENERATE, tokens, sampling=sampling)])
            return [""] * len(requests)

    class ReplayLM(ChatTemplate, LM):
        """Answers each lm-eval request with the engine's answer at one setting."""

        def __init__(self, tokenizer: Any, answers: dict[str, Any]) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.answers = answers  # instance key -> (logprob, is_greedy) | logprob | text

        def _answer(self, inst: Any) -> Any:
            key = instance_key(inst.request_type, inst.args)
            if key not in self.answers:
                raise TaskError(
                    f"no engine answer for a {inst.request_type} request of {inst.task_name} "
                    f"(doc {inst.doc_id}): lm-eval built other requests than were recorded"
                )
            return self.answers[key]

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            return [self._answer(r) for r in requests]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            return [self._answer(r) for r in requests]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list:
            return [self._answer(r) for r in requests]

    return RecordingLM, ReplayLM


# --- the passes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    requests: tuple[EngineRequest, ...]  # deduplicated, in the order lm-eval built them
    items: tuple[dict[str, Any], ...]  # one per lm-eval request (ITEM_SCHEMA without the id)
    ignored_gen_kwargs: tuple[str, ...]
    n_docs: dict[str, int]  # documents per task


def record_requests(loaded: LoadedTasks, tokenizer: Any, options: EvalOptions) -> Recorded:
    """Run lm-eval's request building once with RecordingLM: every engine request, and which
    lm-eval request each serves."""
    recording_cls, _ = _lm_classes()
    lm = recording_cls(tokenizer, options.max_length)
    try:
        _evaluate(loaded, lm, options)
    except TaskError:
        raise
    except Exception as e:  # a template that fails on a document, a filter that does not exist
        raise TaskError(_load_error(loaded.names, e)) from None
    if not lm.requests:
        raise TaskError(f"--tasks {','.join(loaded.names)}: lm-eval built no requests")
    docs: dict[str, set[int]] = {}
    for item in lm.items:
        docs.setdefault(item["task"], set()).add(item["doc_id"])
    return Recorded(
        requests=tuple(lm.requests.values()),
        items=tuple(lm.items),
        ignored_gen_kwargs=tuple(sorted(lm.ignored)),
        n_docs={task: len(ids) for task, ids in sorted(docs.items())},
    )


def instance_answers(items: Sequence[dict[str, Any]], answers: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's answer per request (instance key) from the engine's answers at one setting
    (engine key -> row of ANSWER_SCHEMA): a loglikelihood's (logprob, is_greedy), a rolling
    loglikelihood's summed logprob over its windows, a generation's text."""
    out: dict[str, Any] = {}
    for item in items:
        rows = [answers[k] for k in item["request_keys"]]
        if item["request_type"] == ROLLING:
            out[item["instance_key"]] = sum(r["logprob"] for r in rows)
        elif item["request_type"] == GENERATE:
            out[item["instance_key"]] = rows[0]["generation"]
        else:
            out[item["instance_key"]] = (rows[0]["logprob"], bool(rows[0]["is_greedy"]))
    return out


def score(
    loaded: LoadedTasks, tokenizer: Any, answers: dict[str, Any], options: EvalOptions
) -> list[dict[str, Any]]:
    """lm-eval's metrics for one setting (answers: instance key -> answer), as score rows
    (task, is_group, metric, filter, value, stderr, higher_is_better, n_samples)."""
    _, replay_cls = _lm_classes()
    results = _evaluate(loaded, replay_cls(tokenizer, answers), options)
    return score_rows(results)


def score_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's results dict as rows: one per (task or group, metric, filter). A group's
    aggregate is listed under "groups" (and, in lm-eval 0.4, under "results" too): once."""
    rows = []
    better = results.get("higher_is_better", {})
    samples = results.get("n-samples", {})
    groups = results.get("groups", {})
    tasks = {k: v for k, v in results.get("results", {}).items() if k not in groups}
    for is_group, section in ((False, tasks), (True, groups)):
        for task, metrics in section.items():
            for key, value in metrics.items():
                if key == "alias" or "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                n = (samples.get(task) or {}).get("effective")
                rows.append(
                    {
                        "task": task,
                        "is_group": is_group,
                        "metric": metric,
                        "filter": filt,
                        "value": _number(value),
                        "stderr": _number(metrics.get(f"{metric}_stderr,{filt}")),
                        "higher_is_better": (better.get(task) or {}).get(metric),
                        "n_samples": int(n) if n is not None else None,
                    }
                )
    return rows


def _number(value: Any) -> float | None:
    """A metric value or stderr as a float; None for lm-eval's "N/A", a non-number or NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _evaluate(loaded: LoadedTasks, lm: Any, options: EvalOptions) -> dict[str, Any]:
    """lm-eval's evaluate() on the loaded tasks, prepared as simple_evaluate prepares them
    (few-shot count and seeds, the global seeds), so every pass builds the same requests."""
    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    set_torch_seed(DEFAULT_OTHER_SEED)
    for task in loaded.tasks.values():
        if options.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=options.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    with quiet_lm_eval(options.verbose):
        return evaluate(
            lm=lm,
            task_dict=loaded.task_dict,
            limit=options.limit,
            bootstrap_iters=options.bootstrap_iters,
            log_samples=False,
            apply_chat_template=options.apply_chat_template,
            fewshot_as_multiturn=options.apply_chat_template,
        )
