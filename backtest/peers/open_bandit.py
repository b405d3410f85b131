#!/usr/bin/env python3
"""A real click log as labeled JSONL: the Open Bandit Dataset's small sample (ZOZO, Inc.;
Saito et al., "Open Bandit Dataset and Pipeline", NeurIPS 2021 Datasets and Benchmarks).

Real impressions of a fashion e-commerce site's recommendation slots, 2019-11-24 to
2019-12-01: 60,000 rows (two logging policies, random and Bernoulli Thompson sampling, times
three campaigns, all, men and women, 10,000 rows each), 287 clicks (0.48%), three positions,
four anonymous (hashed) user-feature fields. The sample ships inside the `obp` package's
source distribution on PyPI (Apache-2.0; the dataset is CC BY 4.0), which this script
downloads with pip (the version and SHA-256 pinned below, checked), so it needs nothing but
the registries.

Each row becomes one labeled impression: `ad_id` = campaign-item, `campaign_id` = the
campaign, `position`, `context` = the four user features (none of the search-ad field names),
`label_id` = policy-campaign-row. Rows are ordered by their timestamp, as they were logged.

    backtest/peers/open_bandit.py OUT.jsonl
"""

import csv
import datetime
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

VERSION = "0.5.7"
SHA256 = "3060d67fedfcfadf1e7a6f2608987f74412b5eb74d2c567edeb147595c68f2a0"
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")


def download(tmp):
    """The pinned sdist, checked. pip refuses the package's metadata on Python 3.11 (it declares
    <3.11), which does not matter for data files: --ignore-requires-python, no dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--no-binary=:all:", "--ignore-requires-python", "-d", str(tmp),
                    f"obp=={VERSION}"], check=True)
    sdist = pathlib.Path(tmp, f"obp-{VERSION}.tar.gz")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"obp-{VERSION}.tar.gz has SHA-256 {digest}, expected {SHA256}: refusing it")
    return sdist


def rows(sdist):
    out = []
    with tarfile.open(sdist) as tar:
        for policy in POLICIES:
            for camp in CAMPAIGNS:
                name = f"obp-{VERSION}/obp/dataset/obd/{policy}/{camp}/{camp}.csv"
                text = tar.extractfile(name).read().decode()
                for r in csv.DictReader(text.splitlines()):
                    ts = datetime.datetime.fromisoformat(r["timestamp"])
                    out.append((ts, f"{policy}-{camp}-{r['']}", camp, r))
    out.sort(key=lambda t: t[0])
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[-1].strip())
    target = pathlib.Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data = rows(download(tmp))
    clicks = 0
    with open(target, "w") as f:
        for ts, label_id, camp, r in data:
            clicked = r["click"] == "1"
            clicks += clicked
            f.write(json.dumps({
                "ts_ms": int(ts.timestamp() * 1000), "ad_id": f"{camp}-{r['item_id']}", "campaign_id": camp,
                "position": int(r["position"]),
                "context": {f"user_feature_{k}": r[f"user_feature_{k}"] for k in range(4)},
                "clicked": clicked, "label_id": label_id,
            }) + "\n")
    print(f"{len(data)} impressions, {clicks} clicks, written to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
