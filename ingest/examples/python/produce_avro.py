#!/usr/bin/env python3
"""Produce serves and clicks to the CTR pipeline's Kafka topics from Python, in its wire format.

This is what a producer in another language does to feed the pipeline without the HTTP adapter:

* Avro binary datum of the record, written with the project's schema files
  (schemas/avro/serve.v2.avsc and click.v1.avsc), behind the Confluent wire header: the magic
  byte 0 and the writer schema's ID as a 4-byte big-endian integer. The IDs are fixed in the
  project's in-code registry (schemas/src/wire.rs): 4 = Serve v2, 2 = Click v1. There is no
  registry server to ask.
* Key: the serve ID as decimal text, for serves and for clicks, with librdkafka's
  `murmur2_random` partitioner (Java's default), so a serve and its clicks land in the same
  partition number as the Rust producers put them.
* Idempotent producer with acks=all; the script fails unless every delivery is acknowledged.
* IDs from the project's 64-bit scheme: 41 bits of milliseconds since 2025-01-01 UTC, 10 bits of
  shard (distinct per concurrently running producer), 12 bits of sequence.

Usage (the virtualenv comes from `scripts/python-env`):

    .run/venv/bin/python ingest/examples/python/produce_avro.py --serves 500 --counts-out counts.json

To a secured cluster, set the variables the Rust services read (confluent-kafka's wheels bundle
librdkafka with TLS and SASL): `CTR_KAFKA_SECURITY_PROTOCOL` (e.g. `sasl_ssl`),
`CTR_KAFKA_CA_FILE`, `CTR_KAFKA_SASL_MECHANISM` (default `SCRAM-SHA-256`),
`CTR_KAFKA_SASL_USERNAME`, `CTR_KAFKA_SASL_PASSWORD`; `eval "$(scripts/stack env sasl)"` sets
them for the local broker's SASL_SSL listener.

It simulates a few ads ("py-ad-0".."py-ad-9") and writes what it produced per ad as JSON, the
same shape as `ctr-ingest simulate --counts-out`, so the end-to-end test can compare the
pipeline's published counts with it.
"""

import argparse
import io
import json
import os
import pathlib
import random
import struct
import sys
import time

import fastavro
from confluent_kafka import Producer

EPOCH_MS = 1_735_689_600_000
SHARD_BITS = 10
SEQUENCE_BITS = 12
SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1
TIME_MASK = (1 << 41) - 1

SERVE_SCHEMA_ID = 4  # schemas/avro/serve.v2.avsc
CLICK_SCHEMA_ID = 2  # schemas/avro/click.v1.avsc


class IdGenerator:
    """The project's ID scheme (schemas/src/id.rs), deterministic when given the time."""

    def __init__(self, shard):
        if not 0 <= shard < (1 << SHARD_BITS):
            raise ValueError(f"shard {shard} out of range 0..=1023")
        self.shard = shard
        self.last_tick = 0
        self.sequence = 0

    def next_at(self, unix_ms):
        tick = max(unix_ms - EPOCH_MS, 0) & TIME_MASK
        if tick > self.last_tick:
            self.last_tick, self.sequence = tick, 0
        else:
            self.sequence += 1
            if self.sequence > SEQUENCE_MASK:
                self.last_tick, self.sequence = self.last_tick + 1, 0
        return (self.last_tick << (SHARD_BITS + SEQUENCE_BITS)) | (self.shard << SEQUENCE_BITS) | self.sequence


def load_schema(path):
    return fastavro.parse_schema(json.loads(pathlib.Path(path).read_text()))


def frame(schema_id, schema, record):
    """Confluent wire format: magic 0, schema ID (big-endian u32), Avro binary datum."""
    out = io.BytesIO()
    out.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def simulate(n_serves, seed, shard, start_ms):
    """Serves with 1-3 of ten ads, clicks 0.2-2 s later; returns events sorted by time and the
    per-ad counts."""
    rng = random.Random(seed)
    ids = IdGenerator(shard)
    ads = [f"py-ad-{i}" for i in range(10)]
    ctr = {ad: 0.02 + 0.02 * i for i, ad in enumerate(ads)}
    counts = {"serves": 0, "clicks": 0, "ads": {}}
    events = []
    for i in range(n_serves):
        ts = start_ms + i * 10
        serve_id = ids.next_at(ts)
        shown = rng.sample(ads, rng.randint(1, 3))
        serve = {
            "serve_id": serve_id,
            "ts_ms": ts,
            "context": {
                "query_category": rng.choice(["travel", "finance", "food"]),
                "geo": rng.choice(["US", "DE"]),
                "device": rng.choice(["mobile", "desktop"]),
                "extra": {"source": "python"},
            },
            "ads": [
                {"ad_id": ad, "campaign_id": "py-camp", "position": pos + 1, "bid": 1.0}
                for pos, ad in enumerate(shown)
            ],
        }
        events.append((ts, 0, "serve", serve))
        counts["serves"] += 1
        for pos, ad in enumerate(shown):
            c = counts["ads"].setdefault(ad, {"impressions": 0, "clicks": 0})
            c["impressions"] += 1
            if rng.random() < ctr[ad] / (1 + pos):
                c["clicks"] += 1
                counts["clicks"] += 1
                click_ts = ts + rng.randint(200, 2000)
                click = {"click_id": ids.next_at(click_ts), "serve_id": serve_id, "ad_id": ad, "ts_ms": click_ts}
                events.append((click_ts, 1, "click", click))
    events.sort(key=lambda e: (e[0], e[1]))
    return events, counts


def security_settings():
    """librdkafka's security settings from the CTR_KAFKA_* variables, as the Rust services
    read them (plaintext when none is set)."""
    env = os.environ
    protocol = env.get("CTR_KAFKA_SECURITY_PROTOCOL", "plaintext")
    out = {"security.protocol": protocol}
    if env.get("CTR_KAFKA_CA_FILE"):
        out["ssl.ca.location"] = env["CTR_KAFKA_CA_FILE"]
    if protocol.startswith("sasl"):
        user, password = env.get("CTR_KAFKA_SASL_USERNAME"), env.get("CTR_KAFKA_SASL_PASSWORD")
        if not (user and password):
            sys.exit(f"{protocol} needs CTR_KAFKA_SASL_USERNAME and CTR_KAFKA_SASL_PASSWORD")
        out.update({
            "sasl.mechanism": env.get("CTR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
            "sasl.username": user,
            "sasl.password": password,
        })
    return out


def main():
    here = pathlib.Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", default=os.environ.get("CTR_KAFKA_BROKERS", "127.0.0.1:19092"))
    p.add_argument("--serves-topic", default="ctr.serves")
    p.add_argument("--clicks-topic", default="ctr.clicks")
    p.add_argument("--schemas-dir", default=str(here.parents[2] / "schemas" / "avro"))
    p.add_argument("--serves", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shard", type=int, default=900, help="ID shard, distinct per running producer")
    p.add_argument("--start-ms", type=int, default=None, help="event time of the first serve (default: now)")
    p.add_argument("--counts-out", default=None)
    args = p.parse_args()

    serve_schema = load_schema(pathlib.Path(args.schemas_dir) / "serve.v2.avsc")
    click_schema = load_schema(pathlib.Path(args.schemas_dir) / "click.v1.avsc")
    start_ms = args.start_ms if args.start_ms is not None else int(time.time() * 1000)
    events, counts = simulate(args.serves, args.seed, args.shard, start_ms)

    producer = Producer({
        "bootstrap.servers": args.brokers,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        **security_settings(),
    })
    failures = []
    delivered = [0]

    def on_delivery(err, msg):
        if err is not None:
            failures.append(f"{msg.topic()}: {err}")
        else:
            delivered[0] += 1

    for _, _, kind, record in events:
        if kind == "serve":
            topic, value = args.serves_topic, frame(SERVE_SCHEMA_ID, serve_schema, record)
        else:
            topic, value = args.clicks_topic, frame(CLICK_SCHEMA_ID, click_schema, record)
        while True:
            try:
                producer.produce(topic, key=str(record["serve_id"]), value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: serve delivery reports, then retry
        producer.poll(0)
    remaining = producer.flush(30)
    if remaining or failures or delivered[0] != len(events):
        print(f"not every event was acknowledged: {remaining} in flight, failures: {failures[:5]}", file=sys.stderr)
        return 1
    print(json.dumps({"events": len(events), "serves": counts["serves"], "clicks": counts["clicks"]}))
    if args.counts_out:
        pathlib.Path(args.counts_out).write_text(json.dumps(counts, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
