//! What the pipeline assumes of the broker, checked against the broker the scripts start.

use std::time::Duration;

use ctr_e2e::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Every restart resumes from an offset inside a producer batch: the broker must deliver the
/// rest of that batch, not skip to the next one.
#[test]
fn consumer_resumes_in_the_middle_of_a_batch() {
    let topic = unique("midbatch");
    create_topics(&[(&topic, 1)]);
    let records: Vec<(String, String, Vec<u8>)> = (0..2_000)
        .map(|i| (topic.clone(), "k".to_string(), format!("{i}").into_bytes()))
        .collect();
    produce_all(&records);
    for start in [1, 7, 333, 1_001, 1_999] {
        let consumer: BaseConsumer = kafka_client()
            .set("group.id", unique("mid"))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(start))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.len() < (2_000 - start) as usize && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                got.push((
                    m.offset(),
                    String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
                ));
            }
        }
        let want: Vec<(i64, String)> = (start..2_000).map(|i| (i, i.to_string())).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "from offset {start}: first received {:?}",
            got.first()
        );
        assert_eq!(got, want, "from offset {start}");
    }
}
