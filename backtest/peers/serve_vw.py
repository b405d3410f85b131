"""Vowpal Wabbit asked at request time, for the serving-quality benchmark (e2e/benches/serving_quality.rs).

    python serve_vw.py TRAIN.jsonl QUERIES.jsonl OUT.txt

TRAIN: labeled impressions in learning order ({"ad_id", "campaign_id", "position", "context", "clicked"}),
the stream the scorer learned. QUERIES: {"ad_id", "campaign_id", "context"}, asked at the top slot.
OUT: one probability per query line. The features are compare.py's (ad, position, each context field,
ad x each field) plus the campaign, hashed by VW; logistic loss, one pass, as compare.py runs it.

VW at its best on this stream: its learning rate is chosen as a VW user chooses it, by the progressive
log loss of one pass over TRAIN (each example predicted before it is learned), never by the held-out
questions or the truth. Every rate's loss and the one chosen go to stderr. (L2 from 1e-7 to 1e-5 and
another --power_t were tried on the bench's stream: no L2 moved the loss by 0.02%, and --power_t 0.7
was 15% worse, so only the rate is searched.)
"""
import json
import math
import sys

from vowpalwabbit import Workspace

from compare import VW_ARGS, VW_RATES

# VW's default learning rate is 0.5; a smaller one keeps a rare ad's few clicks from moving its
# weights as far. The flags and the rates are compare.py's.
SETTINGS = [f"-l {rate}" for rate in VW_RATES]


def features(r, position):
    pairs = sorted(r["context"].items())
    base = [f"ad={r['ad_id']}", f"camp={r.get('campaign_id', '')}", f"pos={position}"]
    base += [f"{k}={v}" for k, v in pairs]
    crosses = [f"ad={r['ad_id']}^{k}={v}" for k, v in pairs]
    return " ".join(x.replace(":", "_").replace("|", "_") for x in base + crosses)


def train(lines, setting):
    """A workspace trained on `lines` (one pass) and its progressive log loss per example."""
    ws = Workspace(f"{' '.join(VW_ARGS)} {setting}")
    loss = 0.0
    for label, text in lines:
        ex = ws.parse(text)
        ws.learn(ex)
        p = min(max(ex.get_simplelabel_prediction(), 1e-9), 1 - 1e-9)
        loss -= math.log(p if label > 0 else 1 - p)
        ws.finish_example(ex)
    return ws, loss / len(lines)


def main():
    train_path, queries, out = sys.argv[1:4]
    with open(train_path) as f:
        rows = [json.loads(line) for line in f]
    lines = [(1 if r["clicked"] else -1, f"{1 if r['clicked'] else -1} |f {features(r, r['position'])}")
             for r in rows]
    best = None
    for setting in SETTINGS:
        ws, loss = train(lines, setting)
        print(f"vw {setting}: progressive log loss {loss:.6f}", file=sys.stderr)
        if best is None or loss < best[1]:
            if best is not None:
                best[0].finish()
            best = (ws, loss, setting)
        else:
            ws.finish()
    ws, loss, setting = best
    print(f"vw chosen: {setting} (progressive log loss {loss:.6f})", file=sys.stderr)
    with open(queries) as f, open(out, "w") as o:
        for line in f:
            r = json.loads(line)
            ex = ws.parse(f"|f {features(r, 1)}")
            ws.predict(ex)
            o.write(f"{ex.get_simplelabel_prediction()}\n")
            ws.finish_example(ex)
    ws.finish()


if __name__ == "__main__":
    main()
