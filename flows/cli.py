"""The `fishmerge` command line. Errors print one readable line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import typing
from collections.abc import Callable, Sequence

from fishmerge.errors import FishmergeError

# Set by every command unless the environment says otherwise (the warm runner sets them before its imports).
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # slow, busy machines
}


def _fields(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


class _Parser(argparse.ArgumentParser):
    """argparse, with bad flags reported as one `fishmerge: error:` line (exit 2) like every other error."""

    def error(self, message: str):  # noqa: D102
        print(f"fishmerge: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless it has none (None, off) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is none for none in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def _option_type(model: type, name: str):
    """argparse type for a field of a pydantic options model: the text validated by the field itself
    (its validators included: sizes such as 256MB for --max-memory), errors as one line."""
    from pydantic import ValidationError

    def parse(text: str):
        try:
            return getattr(model.model_validate({name: text}), name)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            if message.startswith("Value error, "):  # fishmerge's own checks say what they got
                raise argparse.ArgumentTypeError(message.removeprefix("Value error, ")) from None
            raise argparse.ArgumentTypeError(f"{message[:1].lower()}{message[1:]}, got {text!r}") from None

    parse.__name__ = name.replace("_", "-")  # argparse names it in "invalid … value" messages
    return parse


def add_option_flags(parser: argparse.ArgumentParser, model: type) -> None:
    """One flag per field of a pydantic options model: --field-name, its type, choices, default and help."""
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):  # a list option is given as a,b (and validated as one text)
            default = ",".join(default)
        kwargs = {"default": default, "help": (info.description or "").replace("%", "%%")}
        if typing.get_origin(info.annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(info.annotation))
        else:
            kwargs["type"] = _option_type(model, name)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from fishmerge import __version__
    from fishmerge.fisher.estimators import ESTIMATORS, get_estimator
    from fishmerge.fisher.options import FisherOptions

    parser = _Parser(prog="fishmerge", description="Fisher-weighted model merging.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fishmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)

    f = command("fisher", "estimate the diagonal Fisher of a model on a dataset into a Zarr store")
    f.add_argument(
        "--model",
        required=True,
        help="local Hugging Face model directory (safetensors + tokenizer), a hub id in the local HF cache "
        "(org/name), or models:/Name@alias",
    )
    f.add_argument("--tracking-uri", help="MLflow registry of a models:/ --model (env MLFLOW_TRACKING_URI wins)")
    f.add_argument("--data", required=True, help="datasets.save_to_disk folder, or a .csv/.json/.jsonl/.parquet file")
    f.add_argument("--split", default="train", help="split of a save_to_disk DatasetDict")
    f.add_argument(
        "--text-fields",
        type=_fields,
        default="text",
        help="one or two text columns: a[,b] (a causal LM: text, or prompt,response — only the response counts)",
    )
    f.add_argument(
        "--messages-field", help="a causal LM's chat column of {role, content} turns (only the last turn counts)"
    )
    labelled = [n for n in ESTIMATORS if get_estimator(n).uses_labels]
    f.add_argument(
        "--label-field", default="label", help=f"label column (needed by the {'/'.join(labelled)} estimator)"
    )
    add_option_flags(f, FisherOptions)
    f.add_argument("--device", default="auto", help="auto | cpu | cuda")
    f.add_argument("--store", help="explicit store location (default: <store-root>/<fisher id>.zarr)")
    f.add_argument(
        "--store-root",
        default=None,
        help="root of content-addressed stores, local or s3://bucket/prefix (default ./.fishmerge/fishers)",
    )
    f.add_argument("--shards", type=int, default=1, help="split the examples into K shards (resumable units)")
    f.add_argument("--workers", type=int, default=1, help="shards computed at once in this process (threads)")
    f.add_argument("--dask-address", help="run shard tasks on this Dask scheduler (tcp://host:8786)")
    f.add_argument("--keep-partials", action="store_true", help="keep per-shard partial sums after the reduce")
    f.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    for name, helptext in (
        ("plan", "check a merge config's inputs and print what the merge will do and cost"),
        ("merge", "merge the models of a config out of core (Prefect flow merge-models)"),
    ):
        p = command(name, helptext)
        p.add_argument("config", help="merge config (YAML)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--shard-size", help="largest output safetensors file (default 2GB, or the config's shard_size)")
        p.add_argument("--threads", type=int, help="merge blocks at once in this process (default: CPU count)")
        if name == "merge":
            p.add_argument("--dask-address", help="run merge blocks on this Dask scheduler (output on shared storage)")
            p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    r = command("run", "the pipeline: Fishers, λ search, merge, evaluation, MLflow registration")
    r.add_argument("config", help="pipeline config (YAML): a merge config plus search/evaluate/register/mlflow")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for name, helptext in (
        ("promote", "make a registered version the champion"),
        ("history", "list registered versions"),
    ):
        p = command(name, helptext)
        p.add_argument("name", help="registered model name")
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (env MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db)"
        )
        if name == "promote":
            p.add_argument("--version", help="version to promote (default: the challenger)")

    i = command("inspect", "print a Fisher store's attributes and per-tensor statistics")
    i.add_argument("store", help="a Fisher store (local path or s3:// URI)")
    sv = command("server", "start, stop or show the Prefect server shared by fishmerge commands on this machine")
    sv.add_argument("action", choices=["start", "stop", "status"], help="what to do")
    sv.add_argument("--port", type=int, help="port of a server to start (default: a free one)")
    fp = command("fingerprint", "print a model's fingerprint, the `model_fingerprint` a Fisher store of it records")
    fp.add_argument(
        "model", help="local Hugging Face model directory (safetensors), hub id (local HF cache) or models:/"
    )
    fp.add_argument("--tracking-uri", help="MLflow registry of a models:/ model (env MLFLOW_TRACKING_URI wins)")
    return parser


def _cmd_fisher(args: argparse.Namespace) -> str:
    from dataclasses import asdict

    from fishmerge.fisher.job import DEFAULT_STORE_ROOT, FisherSpec, existing_store, resolve
    from fishmerge.fisher.options import FisherOptions
    from fishmerge.io import storage
    from fishmerge.io.model_ref import resolve_model_ref

    if args.shards < 1 or args.workers < 1:
        raise FishmergeError(f"--shards and --workers must be ≥ 1, got {args.shards} and {args.workers}")
    spec = FisherSpec(
        model=resolve_model_ref(args.model, tracking_uri=args.tracking_uri),
        data=args.data,
        split=args.split,
        text_fields=args.text_fields,
        label_field=args.label_field or None,
        messages_field=args.messages_field or None,
        device=args.device,
        **{name: getattr(args, name) for name in FisherOptions.model_fields},
    )
    root = args.store_root or DEFAULT_STORE_ROOT
    storage.check_writable_root(storage.normalize(args.store).rsplit("/", 1)[0] if args.store else root)
    # Fast path, before any flow machinery: the same spec computed before is returned at once.
    found = existing_store(resolve(spec, args.store, root))
    if found:
        print(f"fisher: reusing {found} (same model, data and options)", file=sys.stderr)
        return found
    if args.dask_address and not os.environ.get("PREFECT_API_URL"):
        print(
            "fisher: warning: PREFECT_API_URL is not set; each Dask worker would start a Prefect server of its "
            "own (slow). Start a server (`prefect server start`) and set PREFECT_API_URL here and on the workers.",
            file=sys.stderr,
        )
    from fishmerge.fisher.store import open_fisher_store
    from fishmerge.flows.estimate_fisher import run_estimate_fisher

    uri = run_estimate_fisher(
        asdict(spec),
        store=args.store,
        store_root=root,
        shards=args.shards,
        workers=args.workers,
        dask_address=args.dask_address,
        keep_partials=args.keep_partials,
        progress=not args.no_progress,
    )
    a = open_fisher_store(uri).attrs
    print(
        f"fisher: {a['estimator']} over {a['n_examples']} examples in {a['wall_time_s']:.1f}s "
        f"({a['examples_per_s']:.1f} ex/s, {a['device']}, {a['model_dtype']})",
        file=sys.stderr,
    )
    return uri


def _known_fishers(cfg) -> dict[str, str]:
    """Fisher stores already computed for the models that give `data:` (no model load)."""
    from fishmerge.fisher.job import DEFAULT_STORE_ROOT, FisherSpec, existing_store, resolve
    from fishmerge.merge.config import fisher_specs

    root = cfg.fisher.store_root or DEFAULT_STORE_ROOT
    found = {}
    for name, spec in fisher_specs(cfg).items():
        uri = existing_store(resolve(FisherSpec(**spec), None, root))
        if uri:
            found[name] = uri
    return found


def _preflight(cfg, **options):
    """Every check of a merge that needs no estimation, before any flow machinery starts."""
    from fishmerge.fisher.job import DEFAULT_STORE_ROOT
    from fishmerge.io import storage
    from fishmerge.merge.config import fisher_specs
    from fishmerge.merge.plan import build_plan

    if fisher_specs(cfg):  # Fishers to estimate: their root must be usable before anything runs
        storage.check_writable_root(cfg.fisher.store_root or DEFAULT_STORE_ROOT)
    return build_plan(cfg, _known_fishers(cfg), **options)


def _cmd_plan(args: argparse.Namespace) -> str:
    from fishmerge.merge.config import load_merge_config, resolve_model_refs
    from fishmerge.merge.plan import format_plan

    cfg = resolve_model_refs(load_merge_config(args.config))
    plan = _preflight(cfg, shard_size=args.shard_size, threads=args.threads, overwrite=args.overwrite)
    return format_plan(plan)


def _cmd_merge(args: argparse.Namespace) -> str:
    from fishmerge.merge.config import load_merge_config, resolve_model_refs
    from fishmerge.merge.plan import format_plan

    cfg = resolve_model_refs(load_merge_config(args.config))
    plan = _preflight(cfg, shard_size=args.shard_size, threads=args.threads, overwrite=args.overwrite)
    print(format_plan(plan), file=sys.stderr)
    from fishmerge.flows.merge import run_merge

    summary = run_merge(
        args.config,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        dask_address=args.dask_address,
        threads=args.threads,
        progress=not args.no_progress,
    )
    if summary.get("reused"):
        print(
            f"merge: {summary['output']} already holds this exact merge (plan {summary['plan_id']}): reused",
            file=sys.stderr,
        )
        return summary["output"]
    print(
        f"merge: {summary['method']} → {summary['output']} in {summary['wall_s']:.1f}s "
        f"({summary['bytes_written'] / 1e6:.1f} MB written, {summary['blocks_resumed']} block(s) resumed)",
        file=sys.stderr,
    )
    return summary["output"]


def _cmd_run(args: argparse.Namespace) -> str:
    from fishmerge.io.model_ref import REGISTRY_PREFIX
    from fishmerge.merge.config import load_merge_config, resolve_model_refs

    cfg = load_merge_config(args.config)  # config errors before any flow machinery starts
    from fishmerge import registry

    registry.tracking_uri(cfg.mlflow.tracking_uri)  # a malformed URI fails here
    refs = [m.path for m in cfg.models] + [cfg.base or ""]
    if not any(r.startswith(REGISTRY_PREFIX) for r in refs):  # registry inputs are resolved by the flow
        _preflight(resolve_model_refs(cfg), overwrite=True)  # the pipeline replaces its own earlier output
    from fishmerge.flows.pipeline import run_pipeline

    out = run_pipeline(args.config, progress=not args.no_progress)
    from fishmerge.pipeline.report import results_table

    lines = ["λ: " + ", ".join(f"{n}={w:.3f}" for n, w in out["weights"].items())]
    if out["results"]:
        lines.append(results_table(out["results"]))
    for name, d in out["decisions"].items():
        lines.append(f"{name}: version {d['version']} {d['decision']} ({d['reason']})")
    lines.append(f"report: {out['report']}")
    print("\n".join(lines), file=sys.stderr)
    return out["output"]


def _registry(args: argparse.Namespace) -> None:
    from fishmerge import registry

    uri = registry.tracking_uri(args.tracking_uri)
    registry.check_reachable(uri)
    registry.point_mlflow_at(uri)


def _cmd_promote(args: argparse.Namespace) -> str:
    from fishmerge import registry

    _registry(args)
    d = registry.promote(args.name, args.version)
    return f"{args.name}: version {d['version']} is champion ({d.get('reason', 'promoted by hand')})"


def _cmd_history(args: argparse.Namespace) -> str:
    from fishmerge import registry

    _registry(args)
    rows = registry.history(args.name)
    if not rows:
        raise FishmergeError(f"no registered model '{args.name}' (or it has no versions)")
    lines = [f"{'version':>7}  {'aliases':<22} {'decision':<17} {'created':<20} metrics / lineage"]
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        lines.append(
            f"{r['version']:>7}  {','.join(r['aliases']) or '-':<22} {str(r.get('decision') or '-'):<17} "
            f"{str(r['created'])[:19]:<20} {metrics} [{str(r.get('lineage'))[:12]}]"
        )
    return "\n".join(lines)


def _cmd_server(args: argparse.Namespace) -> str:
    from fishmerge.flows import server

    if args.action == "start":
        s = server.start(args.port)
        how = "started" if s["started"] else "already running"
        runner = (
            f"warm runner pid {s['runner']['pid']}"
            if s["runner_ready"]
            else f"the warm runner is not serving (see {s['runner']['log']}): commands run in their own process"
        )
        return (
            f"{s['url']} ({how}, pid {s['pid']}; {runner}; commands without PREFECT_API_URL report to it; "
            f"log {s['log']})"
        )
    if args.action == "stop":
        s = server.stop()
        if s is None:
            return "no shared Prefect server was recorded"
        if not s["stopped"]:
            return (
                f"the recorded server at {s['url']} no longer runs (pid {s['pid']} is gone or is not the server "
                "fishmerge started: left alone): its record is removed"
            )
        return f"stopped the shared Prefect server at {s['url']}"
    s = server.running()
    if not s:
        return f"no shared Prefect server running ({server.state_path()})"
    runner = f"warm runner pid {s['runner']['pid']}" if server.runner_alive(s) else "no warm runner"
    return f"{s['url']} (pid {s['pid']}; {runner})"


def _cmd_fingerprint(args: argparse.Namespace) -> str:
    from fishmerge.io.checkpoint import model_fingerprint
    from fishmerge.io.model_ref import resolve_model_ref

    return model_fingerprint(resolve_model_ref(args.model, tracking_uri=args.tracking_uri))


def _cmd_inspect(args: argparse.Namespace) -> str:
    from fishmerge.fisher.report import inspect_store

    text, problems = inspect_store(args.store)
    if problems:
        print(text)
        raise FishmergeError(
            f"the Fisher store '{args.store}' is damaged: {'; '.join(problems[:3])}"
            f"{' …' if len(problems) > 3 else ''}. Recompute it (delete it and rerun `fishmerge fisher`)"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fishmerge` console script."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        handler = {
            "fisher": _cmd_fisher,
            "inspect": _cmd_inspect,
            "fingerprint": _cmd_fingerprint,
            "server": _cmd_server,
            "plan": _cmd_plan,
            "merge": _cmd_merge,
            "run": _cmd_run,
            "promote": _cmd_promote,
            "history": _cmd_history,
        }[args.command]
        if handler in (_cmd_fisher, _cmd_merge, _cmd_run):  # they run flows: no temporary server when one is shared
            from fishmerge.flows.server import use_shared_server

            url = use_shared_server()
            if url:
                print(
                    f"prefect: reporting to the shared server at {url} (fishmerge server stop ends it)", file=sys.stderr
                )
        result = handler(args)
    except FishmergeError as exc:
        print(f"fishmerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fishmerge: interrupted; nothing was written at the output path", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line (the traceback with FISHMERGE_DEBUG=1)
        if os.environ.get("FISHMERGE_DEBUG"):
            raise
        print(
            f"fishmerge: internal error: {type(exc).__name__}: {exc} (a bug in fishmerge: please report it; "
            "FISHMERGE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    print(result)
    return 0


def _exit_without_teardown(status: list[int]) -> None:
    """The last exit handler: every other one has run (Prefect's log and event drains, a temporary
    server's stop, logging's flush) and non-daemon threads were joined before them; the process then
    ends without the interpreter tearing down the modules it imported (torch, transformers, Prefect:
    0.7–1.7 s of CPU on the 2-core machine, docs/benchmarks.md). Files are written and closed by then.
    A result that cannot be written to stdout (closed pipe, full disk) fails the command (120, as
    Python's own exit would), never a silent 0."""
    import logging

    logging.shutdown()
    try:
        if sys.stdout is None:  # started with descriptor 1 closed: print() wrote nothing
            raise OSError("standard output is closed")
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        if status[0] == 0:
            status[0] = 120
            try:
                print(f"fishmerge: error: could not write the result to stdout: {exc}", file=sys.stderr)
            except (OSError, ValueError):
                pass
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(status[0])


def _runs_in_runner(argv: list[str]) -> bool:
    """Every command but `server` may run in the warm runner, unless FISHMERGE_NO_WARM is set."""
    return bool(argv) and argv[0] != "server" and not os.environ.get("FISHMERGE_NO_WARM")


def run(use_runner: bool = True, exit_handlers: Sequence[tuple[Callable, tuple, dict]] = ()) -> None:
    """The `fishmerge` console command only (it decides how the whole process ends): the command in the
    warm runner when one serves it (`flows.warm`), else `main` here, then a fast exit with its status
    (`_exit_without_teardown`). FISHMERGE_NO_FAST_EXIT=1 keeps Python's own exit, for tools that hook the
    interpreter's end (coverage of subprocesses, tracing exporters). The runner's child passes
    `use_runner=False` and the exit handlers its imports registered (`(func, args, kwargs)`): they go
    behind the fast exit, where they would be had this command imported those modules itself."""
    if use_runner and _runs_in_runner(sys.argv[1:]):
        from fishmerge.flows.warm import run_in_runner

        served = run_in_runner(sys.argv[1:])
        if served is not None:
            sys.exit(served)
    status = [1]
    if not os.environ.get("FISHMERGE_NO_FAST_EXIT"):
        atexit.register(_exit_without_teardown, status)  # registered first: runs after every later handler
    for func, args, kwargs in exit_handlers:
        atexit.register(func, *args, **kwargs)
    try:
        status[0] = main()
    except SystemExit as exc:  # argparse: --help, --version, a bad flag
        if isinstance(exc.code, int) or exc.code is None:
            status[0] = exc.code or 0
        else:  # a message, as Python itself would print it
            print(exc.code, file=sys.stderr)
            status[0] = 1
    except KeyboardInterrupt:
        print("fishmerge: interrupted", file=sys.stderr)
        status[0] = 130
    sys.exit(status[0])


if __name__ == "__main__":
    run()
