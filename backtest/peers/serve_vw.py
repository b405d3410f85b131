"""Vowpal Wabbit asked at request time, for the serving-quality benchmark (e2e/benches/serving_quality.rs).

    python serve_vw.py TRAIN.jsonl QUERIES.jsonl OUT.txt

TRAIN: labeled impressions in learning order ({"ad_id", "campaign_id", "position", "context", "clicked"}),
the stream the scorer learned. QUERIES: {"ad_id", "campaign_id", "context"}, asked at the top slot.
OUT: one probability per query line. The features are compare.py's (ad, position, each context field,
ad x each field) plus the campaign, hashed by VW; logistic loss, one pass, as compare.py runs it.
"""
import json
import sys

from vowpalwabbit import Workspace


def features(r, position):
    pairs = sorted(r["context"].items())
    base = [f"ad={r['ad_id']}", f"camp={r.get('campaign_id', '')}", f"pos={position}"]
    base += [f"{k}={v}" for k, v in pairs]
    crosses = [f"ad={r['ad_id']}^{k}={v}" for k, v in pairs]
    return " ".join(x.replace(":", "_").replace("|", "_") for x in base + crosses)


def main():
    train, queries, out = sys.argv[1:4]
    ws = Workspace("--loss_function logistic --link logistic -b 22 --quiet")
    with open(train) as f:
        for line in f:
            r = json.loads(line)
            ex = ws.parse(f"{1 if r['clicked'] else -1} |f {features(r, r['position'])}")
            ws.learn(ex)
            ws.finish_example(ex)
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
