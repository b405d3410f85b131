#!/usr/bin/env python3
"""Our learners against Vowpal Wabbit and River on the same labeled stream, in one run.

Every learner sees the same labeled impressions (the backtest's labeled JSONL format) in the
same order with progressive validation: each example is scored before the learner learns from
it. Features are equivalent hashed features: the ad, the position, each context field, and the
ad crossed with each context field. Printed side by side: log loss, normalized entropy, AUC,
calibration (sum p / sum y) and examples per second of the learning loop alone (examples are
built before the clock starts, for the peers as for ours, whose figure is the backtest's
model-only rate). Vowpal Wabbit also runs once more at its best learning rate: the one of
VW_RATES with the lowest progressive log loss on the stream, as its users tune it. Each learner
runs `--repeat` times, the runs interleaved (ours, VW, River, ours, ...), and its best rate is
reported: the machine is shared, and interleaving exposes every learner to the same noise. The
learners are deterministic, so every repeat must give the same predictions; the script checks it.
Then the second half alone: a linfa-logistic batch model fitted on the first half (ctr-backtest
--batch-baseline) against every online learner over the same examples.

    backtest/peers/compare.py --input labeled.jsonl            # uses target/release/ctr-backtest
    backtest/peers/compare.py --generate 200000 --input /tmp/l.jsonl   # writes a synthetic stream first

Run through `scripts/compare-peers`, which makes the Python environment and the release build.
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np


def read(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def generate(path, n, seed=3):
    """A synthetic marketplace with known probabilities (60 ads, positions, device lean,
    category affinity), written as labeled JSONL."""
    rng = np.random.default_rng(seed)
    ads = 60
    base = np.exp(rng.normal(math.log(0.03), 0.5, ads))
    fav = rng.integers(0, 5, ads)
    lean = rng.uniform(0.6, 1.4, (ads, 2))
    pop = 1.0 / np.arange(1, ads + 1)
    pop /= pop.sum()
    with open(path, "w") as f:
        for i in range(n):
            ad = int(rng.choice(ads, p=pop))
            pos = int(rng.integers(1, 4))
            cat = int(rng.integers(0, 5))
            dev = int(rng.integers(0, 2))
            p = base[ad] * (2.0 if cat == fav[ad] else 0.8) * lean[ad, dev] * [1.0, 0.6, 0.4][pos - 1]
            clicked = bool(rng.random() < min(p, 0.9))
            f.write(json.dumps({
                "ts_ms": 1_760_000_000_000 + i * 10, "ad_id": f"ad-{ad}", "position": pos,
                "context": {"query_category": f"cat{cat}", "geo": "US", "device": ["mobile", "desktop"][dev]},
                "clicked": clicked,
            }) + "\n")


def generate_wide(path, n, seed=5):
    """A wider synthetic stream: 500 ads in 40 campaigns (Zipf popularity), three positions and
    eight context fields of 3 to 24 values, each with a multiplicative effect; observed CTR
    about 1.7%. About 20 features per example for every learner (VW sees 18)."""
    rng = np.random.default_rng(seed)
    ads = 500
    base = np.exp(rng.normal(math.log(0.03), 0.5, ads))
    pop = 1.0 / np.arange(1, ads + 1)
    pop /= pop.sum()
    ad = rng.choice(ads, size=n, p=pop)
    pos = rng.integers(1, 4, n)
    cards = [8, 6, 3, 24, 10, 5, 12, 4]
    vals = [rng.integers(0, c, n) for c in cards]
    effects = [rng.normal(0, 0.2, c) for c in cards]
    logit = np.log(base[ad]) + sum(e[v] for e, v in zip(effects, vals)) + np.array([0, -0.5, -0.9])[pos - 1]
    clicked = rng.random(n) < 1 / (1 + np.exp(-logit))
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "ts_ms": 1_760_000_000_000 + i * 10, "ad_id": f"ad-{ad[i]}", "campaign_id": f"c-{ad[i] % 40}",
                "position": int(pos[i]), "context": {f"f{k}": f"v{vals[k][i]}" for k in range(len(cards))},
                "clicked": bool(clicked[i]),
            }) + "\n")


def features(r):
    ctx = r["context"]
    pairs = sorted(ctx.items())
    base = [f"ad={r['ad_id']}", f"pos={r['position']}"] + [f"{k}={v}" for k, v in pairs]
    crosses = [f"ad={r['ad_id']}^{k}={v}" for k, v in pairs]
    return base + crosses


def metrics(p, y, secs):
    p = np.clip(np.asarray(p, dtype=float), 1e-9, 1 - 1e-9)
    y = np.asarray(y, dtype=float)
    ll = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    ctr = y.mean()
    h = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    # Ties share their average rank.
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    pos = y.sum()
    auc = (ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos))
    return {"log_loss": ll, "ne": ll / h, "auc": float(auc), "calibration": float(p.sum() / y.sum()),
            "events_per_sec": len(y) / secs}


VW_ARGS = ["--loss_function", "logistic", "--link", "logistic", "-b", "22", "--quiet"]


def vw_lines(rows):
    return [f"{1 if r['clicked'] else -1} |f " + " ".join(x.replace(":", "_").replace("|", "_") for x in features(r))
            for r in rows]


def run_vw_native(rows, extra=()):
    """VW as its users run it: its own driver reading a text file (`vw -d FILE -p PREDS`, here
    `python -m vowpalwabbit`, the wheel's entry to the same C++ driver). One pass predicts each
    example before learning it, so the predictions are progressive. Timed: the whole process
    (interpreter start-up included, about 0.1 s), writing the file is not. `extra`: more of
    VW's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        data, preds = pathlib.Path(tmp, "train.vw"), pathlib.Path(tmp, "preds.txt")
        data.write_text("\n".join(vw_lines(rows)) + "\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vowpalwabbit", "-d", str(data), "-p", str(preds), *VW_ARGS,
                        *extra], check=True)
        secs = time.perf_counter() - start
        p = [float(line.split()[0]) for line in preds.read_text().splitlines() if line.strip()]
    if len(p) != len(rows):
        sys.exit(f"VW's driver wrote {len(p)} predictions for {len(rows)} examples")
    return p, secs


# The learning rates searched for VW at its best: its default 0.5 and smaller ones.
VW_RATES = (0.5, 0.2, 0.1, 0.05, 0.02)


def vw_best_rate(rows, y):
    """VW's native driver at the learning rate with the lowest progressive log loss on this
    stream: how a VW user would tune it. The choice is made on the very predictions that are
    scored, which favours VW a little. Returns (rate, predictions, seconds)."""
    best = None
    for rate in VW_RATES:
        p, secs = run_vw_native(rows, ("-l", str(rate)))
        loss = metrics(p, y, secs)["log_loss"]
        print(f"VW -l {rate}: progressive log loss {loss:.6f}", file=sys.stderr)
        if best is None or loss < best[0]:
            best = (loss, rate, p, secs)
    return best[1:]


def base_rate(rows, mean=0.02, strength=10.0):
    """The running click rate with our count model's global prior (mean 2%, 10
    pseudo-impressions, no decay): what a learner must beat to be worth deploying."""
    clicks = seen = 0.0
    preds = []
    start = time.perf_counter()
    for r in rows:
        preds.append((clicks + mean * strength) / (seen + strength))
        clicks += 1.0 if r["clicked"] else 0.0
        seen += 1.0
    return preds, time.perf_counter() - start


def run_vw(rows):
    from vowpalwabbit import Workspace
    ws = Workspace(" ".join(VW_ARGS))
    lines = vw_lines(rows)
    preds = []
    start = time.perf_counter()
    for line in lines:
        ex = ws.parse(line)
        ws.learn(ex)  # predicts first, then updates: progressive validation
        preds.append(ex.get_simplelabel_prediction())
        ws.finish_example(ex)
    secs = time.perf_counter() - start
    ws.finish()
    return preds, secs


def run_river(rows):
    from river import linear_model, optim
    model = linear_model.LogisticRegression(optimizer=optim.FTRLProximal(alpha=0.05, beta=1.0, l1=0.0, l2=1.0))
    xs = [{f: 1.0 for f in features(r)} for r in rows]
    preds = []
    start = time.perf_counter()
    for x, r in zip(xs, rows):
        preds.append(model.predict_proba_one(x).get(True, 0.0))
        model.learn_one(x, bool(r["clicked"]))
    return preds, time.perf_counter() - start


def run_ours(path, binary, baseline, layout_partitions):
    with tempfile.TemporaryDirectory() as out:
        cmd = [binary, "--input", str(path), "--report", out, "--no-progress",
               "--layout-partitions", str(layout_partitions)]
        if baseline:
            cmd.append("--batch-baseline")
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        return json.loads(pathlib.Path(out, "report.json").read_text())


QUALITY = ("log_loss", "ne", "auc", "calibration")


def same_quality(a, b):
    return all(a[k] == b[k] for k in QUALITY)


def main():
    repo = pathlib.Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--generate", type=int, default=0, help="write a synthetic stream of N examples to --input first")
    ap.add_argument("--generate-wide", type=int, default=0,
                    help="write the wider synthetic stream (eight context fields, ~20 features) of N examples first")
    ap.add_argument("--no-batch-baseline", action="store_true", help="skip the batch baseline (slow on big inputs)")
    ap.add_argument("--binary", default=str(repo / "target" / "release" / "ctr-backtest"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per learner, interleaved; the best rate is kept")
    ap.add_argument("--layout-partitions", type=int, default=1,
                    help="ours in the layout of an N-partition labeled topic, as production learns (default 1: one state)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.generate:
        generate(args.input, args.generate)
    if args.generate_wide:
        generate_wide(args.input, args.generate_wide)
    rows = read(args.input)
    y = [1.0 if r["clicked"] else 0.0 for r in rows]
    vw_name = "Vowpal Wabbit, native driver (-d file)"
    vw_loop_name = "Vowpal Wabbit, Python per-example loop"
    river_name = "River (LogisticRegression, FTRL-Proximal)"
    peers = {vw_loop_name: run_vw, vw_name: run_vw_native, river_name: run_river,
             "running base rate (prior 2%, 10)": base_rate}
    results, peer_preds, rates = {}, {}, {}
    ours = None
    for rep in range(args.repeat):
        # The batch baseline (a slow fit) only once: it does not touch the online rates.
        run = run_ours(args.input, args.binary, rep == 0 and not args.no_batch_baseline, args.layout_partitions)
        ours = ours or run
        for m in run["models"]:
            name = f"ours: {m['name']}"
            if name in results and not same_quality(results[name], m):
                sys.exit(f"{name}: repeat {rep + 1} gave different metrics; the learner is not deterministic")
            results.setdefault(name, {k: m[k] for k in QUALITY})
            rates.setdefault(name, []).append(m["events_per_sec"])
        for name, learner in peers.items():
            p, secs = learner(rows)
            if name == vw_name and vw_loop_name in peer_preds and not np.allclose(p, peer_preds[vw_loop_name], atol=1e-4):
                sys.exit("VW's native driver and its Python loop disagree: not the same learner")
            if name in peer_preds and p != peer_preds[name]:
                sys.exit(f"{name}: repeat {rep + 1} gave different predictions")
            peer_preds[name] = p
            results[name] = {k: v for k, v in metrics(p, y, secs).items() if k in QUALITY}
            rates.setdefault(name, []).append(len(rows) / secs)
    # VW's quality at its best learning rate (its speed does not depend on the rate: the
    # native row above is its rate).
    rate, p, secs = vw_best_rate(rows, y)
    vw_best_name = f"Vowpal Wabbit, native, best rate (-l {rate})"
    peer_preds[vw_best_name] = p
    results[vw_best_name] = {k: v for k, v in metrics(p, y, secs).items() if k in QUALITY}
    rates[vw_best_name] = [len(rows) / secs]
    for name, r in rates.items():
        results[name]["events_per_sec"] = max(r)
        results[name]["events_per_sec_runs"] = r
    vw_rate, river_rate = results[vw_name]["events_per_sec"], results[river_name]["events_per_sec"]
    print(f"{len(rows)} examples, observed CTR {np.mean(y):.4f}; rates are the best of {args.repeat} interleaved runs")
    if args.layout_partitions > 1:
        print(f"ours: in the layout of a {args.layout_partitions}-partition labeled topic (each partition learns alone)")
    print(f"{'learner':44} {'log loss':>9} {'NE':>7} {'AUC':>7} {'calib':>7} {'examples/s':>11} {'vs VW':>7} {'vs River':>8}")
    for name, m in list(results.items()):
        rate = m["events_per_sec"]
        print(f"{name:44} {m['log_loss']:9.5f} {m['ne']:7.4f} {m['auc']:7.4f} {m['calibration']:7.4f} {rate:11.0f}"
              f" {rate / vw_rate:6.1f}x {rate / river_rate:7.1f}x")
    base = ours.get("baseline")
    if base:
        b = base["batch"]
        half = len(rows) - b["split_at"]
        # The peers over the same second half, from their progressive predictions.
        second = {}
        for name, p in peer_preds.items():
            second[name] = metrics(p[b["split_at"]:], y[b["split_at"]:], 1.0)
        print(f"\nSecond half only ({half} examples): the batch baseline fitted on the first half "
              f"({b['train_rows']} rows, {b['features']} features, {b['fit_seconds']:.1f} s) against "
              f"every online learner's progressive predictions over the same examples")
        print(f"{'learner':44} {'log loss':>9} {'NE':>7} {'AUC':>7} {'calib':>7}")
        for m in base["online_after_split"]:
            print(f"{'ours: ' + m['name']:44} {m['log_loss']:9.5f} {m['ne']:7.4f} {m['auc']:7.4f} {m['calibration']:7.4f}")
        for name, m in second.items():
            print(f"{name:44} {m['log_loss']:9.5f} {m['ne']:7.4f} {m['auc']:7.4f} {m['calibration']:7.4f}")
        print(f"{b['name']:44} {b['log_loss']:9.5f} {b['ne']:7.4f} {b['auc']:7.4f} {b['calibration']:7.4f}")
        results["second_half"] = {"batch": b, "ours": base["online_after_split"], "peers": second}
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps({"examples": len(rows), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
