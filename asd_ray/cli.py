"""The ``asd-ray`` command: synth, run, evaluate, compare, embed, finetune, sweep, serve-fleet."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from asd_ray.cli_args import DETECTORS, build_parser as _build_parser, detector_names
from asd_ray.config import ConfigError, RunConfig, given_keys, load_config
from asd_ray.data.layout import LayoutError, discover, summarise

log = logging.getLogger("asd_ray")

# The offline demo corpus: every dev machine, small enough to finish in a few minutes on 2 cores.
DEMO_SIZES = {"train_source": 100, "train_target": 10, "test_per_cell": 25, "supplemental": 2, "seconds": 5.0}


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(__doc__)


def run_config(config_path, overrides, backbone=None) -> RunConfig:
    overrides = list(overrides) + ([f"embed.backbone={backbone}"] if backbone else [])
    return load_config(RunConfig, config_path, overrides)


def embedding_config(config_path, overrides, backbone=None) -> RunConfig:
    """``run_config`` of a command that embeds: a backbone that cannot be opened here (a missing directory, a hub
    id offline) is a one-line error now, not a traceback from every embedding actor once Ray has started."""
    from asd_ray.models.hub import check_available

    config = run_config(config_path, overrides, backbone)
    check_available(config.embed.backbone)
    return config


def cmd_synth(args) -> int:
    from asd_ray.data.synth import generate_corpus

    # eval machines only when asked: --eval-machines alone is all of the year's (None: generate_corpus's default)
    eval_machines = () if args.eval_machines is None else (args.eval_machines or None)
    root = generate_corpus(args.out, dev_machines=args.machines or None, eval_machines=eval_machines,
                           train_source=args.train_source, train_target=args.train_target,
                           test_per_cell=args.test_per_cell, supplemental=args.supplemental,
                           seconds=args.seconds, seed=args.seed, workers=args.workers, style=args.style,
                           year=args.year, noise=args.noise)
    s = summarise(discover([root]))
    print(f"wrote {s['clips']} clips under {root}")
    return 0


def demo_corpus(out: Path) -> Path:
    """Generate (once) the small synthetic corpus the offline demo runs on."""
    from asd_ray.data.synth import generate_corpus

    root = out / "synthetic_data"
    if not (root / "dev_data").is_dir():
        print(f"no --data given: generating the synthetic demo corpus under {root}")
        generate_corpus(root, eval_machines=(), workers=os.cpu_count() or 1, **DEMO_SIZES)
    return root


def runner(local: bool):
    """The single-process reference run, or the same run on Ray (equal results)."""
    if local:
        from asd_ray.detect import reference_run
        return reference_run
    from asd_ray.distributed.run import ray_run
    return ray_run


def check_settings_read(config_path, overrides, configs: list[RunConfig]) -> None:
    """A setting the user gave that none of the run's detectors reads is an error naming what applies instead."""
    from asd_ray.detectors import unread_settings

    unread = unread_settings(configs[0], given_keys(config_path, overrides), [c.detector for c in configs])
    if unread:
        raise ConfigError("; ".join(unread))


def cmd_run(args) -> int:
    overrides = [*args.overrides, *([f"detector={args.detector}"] if args.detector else [])]
    config = embedding_config(args.config, overrides, args.backbone)
    check_settings_read(args.config, [*overrides, *([f"embed.backbone={args.backbone}"] if args.backbone else [])],
                        [config])
    roots = args.data or [demo_corpus(args.out)]
    report = runner(args.local)(roots, config, args.out, args.machines)
    print(f"clips: {report.clips_in} in, {report.clips_embedded} embedded, {len(report.rejects)} rejected, "
          f"{len(report.unused)} unused (see {args.out}/rejects.csv, unused.csv)")
    if report.metrics:
        print(format_metrics(report.metrics))
    t = report.timings
    warm = f"Ray workers' warm-up {t['warm_up']:.1f} s, " if "warm_up" in t else ""
    print(f"time: discover {t['discover']:.1f} s, {warm}embed {t['embed']:.1f} s ({report.clips_embedded / max(t['embed'], 1e-9):.0f} "
          f"clips/s), banks and scoring {t['fit_score']:.1f} s, report {t['report']:.1f} s")
    print(f"official CSVs, metrics.json and report.md in {args.out}")
    return 0


def cmd_compare(args) -> int:
    from asd_ray.report import write_comparison

    names = detector_names(args.detectors)
    embedding_config(args.config, args.overrides)
    run = runner(args.local)
    roots = args.data or [demo_corpus(args.out)]
    reports, features, fits = {}, {}, {}  # detectors that eat the same features embed the corpus once; one AE for two
    configs = {name: run_config(args.config, [*args.overrides, *DETECTORS[name]]) for name in names}
    check_settings_read(args.config, args.overrides, list(configs.values()))
    for i, (name, config) in enumerate(configs.items(), 1):
        print(f"compare: detector {i}/{len(configs)}: {name}", file=sys.stderr, flush=True)
        reports[name] = run(roots, config, args.out / name, args.machines, feature_cache=features, fits=fits)
        met = reports[name].metrics
        print(f"{name}: " + ("; ".join(f"{s} official score {v['official_score']:.4f}"
                                        for s, v in met["splits"].items()) if met else "no ground truth"))
    path = write_comparison(reports, args.out)
    print(path.read_text().split("\n\n![")[0])
    return 0


def format_metrics(metrics: dict) -> str:
    """Per split: each machine's AUC_s, AUC_t, pAUC, h-mean (and F1 per domain when decisions were scored),
    the split's official score; then which split the top-level score is."""
    lines = []
    for name, split in metrics["splits"].items():
        f1 = all("f1_source" in v for v in split["machines"].values())
        lines.append(f"{name}:")
        lines.append(f"{'machine':<14} {'AUC_s':>7} {'AUC_t':>7} {'pAUC':>7} {'hmean':>7}"
                     + (f" {'F1_s':>7} {'F1_t':>7}" if f1 else ""))
        for m, v in split["machines"].items():
            lines.append(f"{m:<14} {v['auc_source']:7.4f} {v['auc_target']:7.4f} {v['pauc']:7.4f} {v['hmean']:7.4f}"
                         + (f" {v['f1_source']:7.4f} {v['f1_target']:7.4f}" if f1 else ""))
        ci = (f" (the evaluator's jackknife ci95 of the pooled AUC and pAUC: {split['official_score_ci95']:.2g})"
              if "official_score_ci95" in split else "")
        lines.append(f"{name} official score (h-mean over its machines): {split['official_score']:.4f}{ci}")
    lines.append(f"official score = the {metrics['headline_split']} score: {metrics['official_score']:.4f}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from asd_ray.scoring.files import evaluate_dir, write_evaluator_results

    metrics = evaluate_dir(args.scores, args.data, args.machines, args.eval_list)
    print(format_metrics(metrics))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        written = write_evaluator_results(args.out, metrics, args.scores.resolve().name)
        print(f"metrics.json{' and ' + ', '.join(str(p) for p in written) if written else ''} in {args.out}"
              + ("" if written else " (no decision_result_* files: no evaluator table)"))
        for name, split in metrics["splits"].items():
            if split.get("machines_without_decisions"):
                print(f"{name}: no evaluator table: no decision_result_* file for "
                      f"{', '.join(split['machines_without_decisions'])} (as the official evaluator, which skips it)")
    else:
        print(json.dumps(metrics))
    return 0


def cmd_serve_fleet(args) -> int:
    from asd_ray.distributed import streams
    from asd_ray.distributed.bank_actors import check_saved_banks

    config = run_config(args.config, args.overrides)
    given = given_keys(args.config, args.overrides)  # score-time settings given here override the saved banks'
    check_saved_banks(args.banks, config)  # a missing folder or a bad bank: an error before Ray
    if args.simulate:
        stats = streams.simulate(args.banks, config, args.out, streams=args.simulate, rate_hz=args.rate,
                                 seconds=args.seconds, given=given, roots=args.data)
        print(json.dumps(dataclasses.asdict(stats)))
        return 0
    if not args.data and args.clips is None:
        raise ConfigError("serve-fleet needs --data ROOT..., --clips DIR --machine M, or --simulate STREAMS")
    results = streams.score_streams(args.banks, config, args.out, roots=args.data, clips=args.clips,
                                    machine=args.machine, given=given)
    bad = sum(1 for r in results if r.error)
    print(f"{len(results) - bad} clips scored, {bad} without a score (see {args.out}/rejects.csv); "
          f"per-stream results in {args.out}/streams.csv")
    return 0


def cmd_serve(args) -> int:
    from asd_ray.distributed import fleet, service
    from asd_ray.distributed.bank_actors import check_saved_banks
    from asd_ray.distributed.http_requests import check_write_access

    overrides = [*args.overrides, *([f"serve.host={args.host}"] if args.host else []),
                 *([f"serve.port={args.port}"] if args.port else []),
                 *(["serve.allow_unauthenticated_writes=true"] if args.allow_unauthenticated_writes else [])]
    config = run_config(args.config, overrides)
    given = given_keys(args.config, overrides)
    if args.stop:
        import ray

        from asd_ray.distributed.session import joins_a_cluster

        if not ray.is_initialized() and not joins_a_cluster():
            raise ConfigError("serve --stop acts on the Ray the service runs on: run it under ray job submit, or "
                              "set RAY_ADDRESS (auto: a ray start cluster on this machine)")
        service.start_ray(config)
        done = service.stop(args.banks, config)
        print(f"scoring service {config.serve.app_name!r}: application {done['application']}"
              f"{', Serve stopped' if done['serve_stopped'] else ''}; bank actors stopped: "
              f"{', '.join(done['banks']) or 'none running'}")
        return 0
    check_saved_banks(args.banks, config)  # a missing folder or a bad bank: an error before Ray
    s = config.serve
    try:
        check_write_access(s.token, s.allow_unauthenticated_writes, s.host)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from asd_ray.distributed.session import route_serve_logs

    route_serve_logs()
    started = service.start_ray(config)
    # the banks load and take the settings, or the error now; detached, they outlive this command on a cluster
    fleet.fleet_banks(args.banks, config, given=given, detached=True)
    service.deploy(args.banks, config, given)
    writes = ("POST /normals refused without a token: set serve.token" if not s.allow_unauthenticated_writes else
              "POST /normals open to every local user (--allow-unauthenticated-writes)")
    print(f"scoring service {s.app_name!r} at http://{s.host}:{s.port} (Serve's HTTP proxy); "
          f"{'a bearer token is required' if s.token else 'no token required; ' + writes}")
    direct = [u for u in service.replica_urls(s.app_name, s.host) if not u.endswith(f":{s.port}")]
    if direct:
        print(f"replicas answer directly (Serve's direct ingress, the fast path) at {' '.join(direct)}")
    print("routes: POST /score, POST /normals, GET /machines, GET /healthz; counters asd_ray_requests_total, "
          "asd_ray_request_errors_total, asd_ray_request_seconds on Ray's metrics port")
    sys.stdout.flush()
    if started or args.block:
        print("serving until Ctrl-C (or SIGTERM)")
        sys.stdout.flush()
        service.serve_until_stopped()
        print(f"scoring service {s.app_name!r} stopped: Serve shut down")
    return 0


def finetune_config(args) -> RunConfig:
    """The fine-tuning run's config, named (``finetune-<time>`` unless ``finetune.name`` is given) once per
    command: its folder, where run.log goes, is known before Ray starts."""
    if getattr(args, "finetune_config", None) is None:
        from asd_ray.distributed.finetune import default_run_name

        flags = ([f"finetune.init={args.init}"] if args.init else []) + \
            ([f"finetune.workers={args.workers}"] if args.workers else []) + (["finetune.use_gpu=yes"] if args.gpu else [])
        config = run_config(args.config, [*args.overrides, *flags])
        if not config.finetune.name:
            config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, name=default_run_name()))
        args.finetune_config = config
    return args.finetune_config


def cmd_finetune(args) -> int:
    from asd_ray.distributed.finetune import finetune

    result = finetune(args.data, finetune_config(args), args.machines)
    last = result.steps[-1] if result.steps else {}
    print(f"fine-tuned on {result.clips} clips ({len(result.rejects)} rejected, {len(result.unused)} not used; "
          f"each listed with its reason in {result.run_dir}/finetune.json); "
          f"last step {last.get('step')}: loss {last.get('loss')}, collapse monitor {last.get('collapse_std')}")
    print(f"backbone checkpoint: {result.checkpoint}  (asd-ray run --backbone {result.checkpoint})")
    return 0


def cmd_sweep(args) -> int:
    from asd_ray.distributed.sweep import check_space_settings, load_space, sweep

    space, config = load_space(args.space), run_config(args.config, args.overrides)
    check_space_settings(space, config, given_keys(args.config, args.overrides))
    result = sweep(args.data, space, config, args.out, args.machines)
    print((args.out / "sweep.md").read_text())
    print(f"{len(result.embedded)} embedding set(s) computed, {len(result.cached)} read from the cache; "
          f"best config: {result.best_config_path} (asd-ray run --config {result.best_config_path})")
    return 0


def cmd_embed(args) -> int:
    from asd_ray.detect import plan_records, write_reasons
    from asd_ray.distributed.run import check_resources, embed_table
    from asd_ray.distributed.session import ensure_ray
    from asd_ray.results import Reject

    config = embedding_config(args.config, args.overrides, args.backbone)
    check_resources(config, strict=ensure_ray(num_cpus=config.ray.num_cpus or None), clip=True)
    used, unused = plan_records(discover(args.data, args.machines, normals_only_roots=config.normals_only_roots))
    table = embed_table(used, config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_reasons(args.out, {"rejects.csv": [Reject.of(r) for r in table.rejects], "unused.csv": unused})
    print(f"{len(table.records)} clips embedded, {len(table.rejects)} rejected, {len(unused)} not used "
          f"(see {args.out}/rejects.csv, unused.csv); Parquet at {table.path}{' (from the cache)' if table.from_cache else ''}")
    return 0


COMMANDS = {"synth": cmd_synth, "run": cmd_run, "evaluate": cmd_evaluate, "serve-fleet": cmd_serve_fleet, "serve": cmd_serve,
            "finetune": cmd_finetune, "sweep": cmd_sweep, "embed": cmd_embed,
            "compare": cmd_compare}


def log_file(args) -> Path | None:
    """Where a command that runs on Ray writes the log lines of Ray and asd-ray: ``<out>/run.log``, and for
    ``finetune`` ``run.log`` in the run's folder (``finetune.storage_path/name``)."""
    if args.command == "finetune":
        from asd_ray.distributed.finetune import run_dir

        return run_dir(finetune_config(args).finetune) / "run.log"
    if args.command in ("run", "compare", "sweep", "serve-fleet", "embed") and not getattr(args, "local", False):
        return args.out / "run.log"
    if args.command == "serve" and not args.stop:
        return args.out / "serve.log"
    return None


def console_logging(verbose: bool) -> None:
    """The command's console handler on the root logger (WARNING and up; everything with -v), added where the root
    logger has none, as ``logging.basicConfig`` would. A process that set up logging itself (an application
    calling ``main``, pytest) keeps its handlers and their levels: the first one used to be set to WARNING here,
    which silenced INFO records for whoever had installed it."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "asd-ray console"]
    if not ours and root.handlers:
        return
    if not ours:
        ours = [logging.StreamHandler()]
        ours[0].set_name("asd-ray console")
        ours[0].setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(ours[0])
        root.setLevel(logging.WARNING)
    ours[0].setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_logging(args.verbose)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from asd_ray.errors import BackboneError, BankError, MetricError
    from asd_ray.progress import bars_on

    watchdog = None
    before = signal.signal(signal.SIGINT, _ctrl_c)
    try:
        path = log_file(args)
        if path is not None:
            from asd_ray.distributed.resources import DEFAULT_HINT, HINTS, Watchdog
            from asd_ray.distributed.session import route_logs

            route_logs(path, args.verbose)
            # a run that waits on resources says so (it probes nothing until the command has joined or started Ray)
            watchdog = Watchdog(hint=HINTS.get(args.command, DEFAULT_HINT)).start()
        with bars_on():
            code = COMMANDS[args.command](args)
    except (ConfigError, LayoutError, MetricError, BankError, BackboneError, FileNotFoundError, ValueError) as err:
        print(f"asd-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if watchdog is not None:
            watchdog.stop()  # before Ray goes: its probe must not call into a Ray shutting down
        return interrupted(args.command)
    finally:
        if watchdog is not None:
            watchdog.stop()
        signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
    if path is not None:
        print(f"log of Ray and asd-ray: {path}")
    return code


def _ctrl_c(signum, frame):
    """SIGINT: the output of Ray's worker processes stops reaching the console at once (a terminal's Ctrl-C reaches
    them too, and the actors that die say so in tracebacks), then the usual ``KeyboardInterrupt``."""
    session = sys.modules.get("asd_ray.distributed.session")
    if session is not None:
        session.mute_worker_output()
    raise KeyboardInterrupt


def interrupted(command: str) -> int:
    """Ctrl-C: one line, Ray shut down (its workers, trials and Train runs end with it), exit status 130. A second
    Ctrl-C while shutting down is ignored rather than left to print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray = sys.modules.get("ray")
    stopped = ""
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        stopped = "; Ray shut down"
    print(f"\nasd-ray {command}: interrupted (Ctrl-C){stopped}", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":
    sys.exit(main())
