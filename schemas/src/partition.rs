//! Which partition a keyed record lands in: Kafka's default partitioner for keyed records
//! (`murmur2_random` in librdkafka, the Java client's default), which every producer of the
//! project uses and the contract requires of producers in other languages.
//!
//! The labeled topic is keyed by ad ID, so this is also where an ad is learned, and therefore
//! where a serving replica finds the model that knows it (a new ad's partition is known before
//! any record of it exists).

/// Seed of Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
const KAFKA_MURMUR2_SEED: u32 = 0x9747_b28c;

/// The partition of a topic with `partitions` partitions that a record keyed `key` goes to.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    (murmur2::murmur2(key.as_bytes(), KAFKA_MURMUR2_SEED) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_kafkas_murmur2_partitions() {
        // Kafka's own murmur2 test vectors (`UtilsTest.testMurmur2`), as the partitioner takes
        // them: the sign bit cleared, then modulo the partition count.
        let cases: [(&str, i32); 5] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
        ];
        for (key, hash) in cases {
            let positive = (hash as u32) & 0x7fff_ffff;
            for n in [1, 2, 4, 7, 12] {
                assert_eq!(partition_of(key, n), positive % n, "{key} in {n}");
            }
        }
    }

    #[test]
    fn one_partition_takes_everything() {
        assert!(
            ["ad-1", "ad-2", "x"]
                .iter()
                .all(|a| partition_of(a, 1) == 0)
        );
    }
}
