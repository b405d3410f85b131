//! The fenced checkpoint store every service keeps its partitions' state in
//! (`ctr_runtime::redis::FencedStore`), against the stack's Redis: a body over the largest
//! value it writes is stored in chunks, read back whole, replaced without leftovers, and a
//! save from behind the stored fence leaves nothing behind; increments are appended only onto
//! the chain they were computed from.

use ctr_e2e::*;
use ctr_runtime::Policy;
use ctr_runtime::redis::{Appended, Chain, FencedStore, Redis, chunk_key};
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

/// A store of one partition at `key` in the stack's Redis, writing values of at most 1,000
/// bytes (so small bodies exercise chunking), fenced by `next`.
async fn small_store(key: &str) -> FencedStore {
    let redis = Redis::connect(&redis_url(), None, redis_cluster(), Policy::default())
        .await
        .expect("Redis (scripts/stack up)");
    let key = key.to_string();
    FencedStore::new(
        redis.manager().await.unwrap(),
        redis.policy(),
        move |_| key.clone(),
        &["next"],
    )
    .with_chunk_bytes(1_000)
}

fn exercise(key: String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut con = redis();
    rt.block_on(async {
        let mut store = small_store(&key).await;

        // 10 chunks, the last one short.
        let first = body(9_500, 1);
        assert!(
            store
                .save(0, &[10], &first, None, 1)
                .await
                .unwrap()
                .is_some()
        );
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
        assert!(
            store
                .save(0, &[20], &second, None, 2)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(store.load(0).await.unwrap().unwrap().body, second);
        let left = keys_of(&mut con, &key);
        assert_eq!(left.len(), 1 + 3, "{left:?}");
        assert!(!left.iter().any(|k| k.contains(&generation)), "{left:?}");

        // A save behind the stored fence is refused, and its staged chunks deleted.
        assert!(
            store
                .save(0, &[15], &body(5_000, 3), None, 3)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(keys_of(&mut con, &key), left);
        assert_eq!(store.load(0).await.unwrap().unwrap().body, second);

        // Inline again (small): no chunk remains.
        let third = body(999, 4);
        assert!(
            store
                .save(0, &[30], &third, None, 4)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(keys_of(&mut con, &key), vec![key.clone()]);
        let saved = store.load(0).await.unwrap().unwrap();
        assert_eq!((saved.body, saved.fence), (third, vec![Some(30)]));
    });
}

#[test]
fn increments_are_appended_only_onto_the_chain_and_links_they_were_computed_from() {
    let key = format!("{}:ckpt:{{t:0}}", unique("chain"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut con = redis();
    rt.block_on(async {
        let mut store = small_store(&key).await;
        let base = body(500, 1);
        let chain = store
            .save(0, &[10], &base, None, 1)
            .await
            .unwrap()
            .expect("a first base");
        assert_eq!(chain.links, 0);

        let (a, b) = (body(100, 2), body(120, 3));
        let linked = store.append(0, &[20], &chain, &a, None, 2).await.unwrap();
        let Appended::Linked(after_a) = linked else {
            panic!("appended onto its own chain: {linked:?}")
        };
        assert_eq!(after_a.links, 1);
        let saved = store.load(0).await.unwrap().unwrap();
        assert_eq!(
            (&saved.body, &saved.increments, &saved.fence),
            (&base, &vec![a.clone()], &vec![Some(20)])
        );
        assert_eq!(saved.chain.as_ref(), Some(&after_a));

        // A writer that has not seen the first increment: its increment does not follow it.
        assert_eq!(
            store.append(0, &[30], &chain, &b, None, 3).await.unwrap(),
            Appended::Diverged
        );
        // Behind the stored fence: refused, as a whole save would be.
        assert_eq!(
            store.append(0, &[15], &after_a, &b, None, 3).await.unwrap(),
            Appended::Refused
        );
        // A retried append that was committed is committed once.
        assert_eq!(
            store.append(0, &[20], &chain, &a, None, 2).await.unwrap(),
            Appended::Linked(after_a.clone())
        );
        let Appended::Linked(after_b) =
            store.append(0, &[30], &after_a, &b, None, 3).await.unwrap()
        else {
            panic!("appended onto its own chain")
        };
        let saved = store.load(0).await.unwrap().unwrap();
        assert_eq!(saved.increments, vec![a, b.clone()]);
        assert_eq!(saved.fence, vec![Some(30)]);
        // Over the largest value: not written, the caller saves whole.
        assert_eq!(
            store
                .append(0, &[40], &after_b, &body(1_001, 4), None, 4)
                .await
                .unwrap(),
            Appended::Diverged
        );

        // A new base starts a new chain; the old chain's increments are gone with it.
        let newer = body(700, 5);
        let next = store
            .save(0, &[40], &newer, None, 5)
            .await
            .unwrap()
            .expect("a base ahead of the stored fence");
        assert_ne!(next.id, chain.id);
        let saved = store.load(0).await.unwrap().unwrap();
        assert_eq!(
            (saved.body, saved.increments),
            (newer, Vec::<Vec<u8>>::new())
        );
        let fields: Vec<String> = con.hkeys(&key).unwrap();
        assert!(!fields.iter().any(|f| f.starts_with("inc:")), "{fields:?}");
        assert_eq!(
            store.append(0, &[50], &after_b, &b, None, 6).await.unwrap(),
            Appended::Diverged,
            "an increment of the replaced chain"
        );
        let stale = Chain {
            id: next.id.clone(),
            links: 3,
        };
        assert_eq!(
            store.append(0, &[50], &stale, &b, None, 6).await.unwrap(),
            Appended::Diverged
        );
        let _: () = con.del(&key).unwrap();
    });
}

/// The scorer's store over the real Redis: a partition checkpointed whole, then as increments,
/// restores to the state that saved the last one; a second owner that restored the chain
/// before the first appended more cannot append onto it, and saves whole instead.
#[test]
fn a_scorer_partition_restores_from_its_base_and_increments_and_a_stale_owner_saves_whole() {
    use ctr_scorer::checkpoint::{CheckpointStore, Kind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let redis = Redis::connect(&redis_url(), None, redis_cluster(), Policy::default())
            .await
            .expect("Redis (scripts/stack up)");
        let prefix = format!("{}:", unique("chainstore"));
        let store = || async {
            CheckpointStore::new(redis.manager().await.unwrap(), redis.policy(), &prefix, "l")
        };
        let mut first = store().await;
        let mut state = default_partition_state();
        feed_fresh_contexts(&mut state, 0, 20_000);
        let kinds = |saved: Option<ctr_scorer::checkpoint::Saved>| saved.expect("written").kind;
        assert_eq!(kinds(first.save(0, &mut state).await.unwrap()), Kind::Whole);
        for round in 0..3 {
            feed_fresh_contexts(&mut state, 20_000 + round * 500, 20_500 + round * 500);
            assert_eq!(
                kinds(first.save(0, &mut state).await.unwrap()),
                Kind::Increment
            );
        }
        let mut second = store().await;
        let mut restored = second.load(0).await.unwrap().expect("the chain");
        assert_eq!(restored.chain().map(|c| c.links), Some(3));
        assert_eq!(restored.snapshot().len(), state.snapshot().len());
        assert_eq!(restored.models(), state.models());
        assert_eq!(restored.total_keys(), state.total_keys());
        assert_eq!(restored.next_offset, state.next_offset);

        // The first owner goes on and appends; the second, which restored before that, has
        // learned the same records meanwhile and more: its increment does not follow the
        // chain any more, so it saves whole.
        feed_fresh_contexts(&mut state, 21_500, 22_000);
        assert_eq!(
            kinds(first.save(0, &mut state).await.unwrap()),
            Kind::Increment
        );
        feed_fresh_contexts(&mut restored, 21_500, 22_500);
        assert_eq!(
            kinds(second.save(0, &mut restored).await.unwrap()),
            Kind::Whole
        );
        // And the first, now behind the stored fence, is refused.
        assert!(first.save(0, &mut state).await.unwrap().is_none());
        let again = second.load(0).await.unwrap().unwrap();
        assert_eq!(again.chain().map(|c| c.links), Some(0));
        assert_eq!(again.next_offset, Some(22_500));
        let _: () = ctr_e2e::redis().del(second.key(0)).unwrap();
    });
}
