//! The fenced checkpoint store every service keeps its partitions' state in
//! (`ctr_runtime::redis::FencedStore`), against the stack's Redis: a body over the largest
//! value it writes is stored in chunks, read back whole, replaced without leftovers, and a
//! save from behind the stored fence leaves nothing behind.

use ctr_e2e::*;
use ctr_runtime::Policy;
use ctr_runtime::redis::{FencedStore, Redis, chunk_key};
use redis::Commands;

/// A body of `len` bytes that differs from every other `seed`'s.
fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The keys of the test's checkpoint and of every chunk of it (on a cluster, `KEYS` asks every
/// master).
fn keys_of(con: &mut TestRedis, key: &str) -> Vec<String> {
    let mut found: Vec<String> = con.keys(format!("{key}*")).unwrap();
    found.extend(con.keys::<_, Vec<String>>(format!("{{{key}}}*")).unwrap());
    found.sort();
    found
}

#[test]
fn a_checkpoint_over_the_value_cap_is_chunked_read_whole_and_replaced_without_leftovers() {
    // With a hash tag (the scorer's keys) and without (the joiner's): on a cluster the chunks
    // must be in the hash's slot either way, or the commit script fails.
    exercise(format!("{}:ckpt:{{t:0}}", unique("chunks")));
    exercise(format!("{}:ckpt:g:t:0", unique("chunks")));
}

fn exercise(key: String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut con = redis();
    rt.block_on(async {
        let redis = Redis::connect(&redis_url(), None, redis_cluster(), Policy::default())
            .await
            .expect("Redis (scripts/stack up)");
        let k = key.clone();
        let mut store = FencedStore::new(
            redis.manager().await.unwrap(),
            redis.policy(),
            move |_| k.clone(),
            &["next"],
        )
        .with_chunk_bytes(1_000);

        // 10 chunks, the last one short.
        let first = body(9_500, 1);
        assert!(store.save(0, &[10], &first, None, 1).await.unwrap());
        let (generation, chunks): (String, usize) = redis::cmd("HMGET")
            .arg(&key)
            .arg("gen")
            .arg("chunks")
            .query(&mut con)
            .unwrap();
        assert_eq!(chunks, 10);
        let state: Option<Vec<u8>> = con.hget(&key, "state").unwrap();
        assert_eq!(state, None, "a chunked body is not also inline");
        for i in 0..chunks {
            let len: usize = con.strlen(chunk_key(&key, &generation, i)).unwrap();
            assert!(len <= 1_000, "chunk {i} holds {len} bytes");
            let ttl: i64 = con.pttl(chunk_key(&key, &generation, i)).unwrap();
            assert_eq!(ttl, -1, "a committed chunk does not expire");
        }
        let saved = store.load(0).await.unwrap().expect("the checkpoint");
        assert_eq!(saved.body, first);
        assert_eq!(saved.fence, vec![Some(10)]);
        assert_eq!(saved.saved_ms, Some(1));
        assert_eq!(keys_of(&mut con, &key).len(), 1 + 10);

        // Replaced by a smaller chunked body: the first one's chunks are gone.
        let second = body(2_001, 2);
        assert!(store.save(0, &[20], &second, None, 2).await.unwrap());
        assert_eq!(store.load(0).await.unwrap().unwrap().body, second);
        let left = keys_of(&mut con, &key);
        assert_eq!(left.len(), 1 + 3, "{left:?}");
        assert!(!left.iter().any(|k| k.contains(&generation)), "{left:?}");

        // A save behind the stored fence is refused, and its staged chunks deleted.
        assert!(
            !store
                .save(0, &[15], &body(5_000, 3), None, 3)
                .await
                .unwrap()
        );
        assert_eq!(keys_of(&mut con, &key), left);
        assert_eq!(store.load(0).await.unwrap().unwrap().body, second);

        // Inline again (small): no chunk remains.
        let third = body(999, 4);
        assert!(store.save(0, &[30], &third, None, 4).await.unwrap());
        assert_eq!(keys_of(&mut con, &key), vec![key.clone()]);
        let saved = store.load(0).await.unwrap().unwrap();
        assert_eq!((saved.body, saved.fence), (third, vec![Some(30)]));
    });
}
