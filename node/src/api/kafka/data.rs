//! `Produce`, `Fetch`, `ListOffsets` and `InitProducerId` over the data service.

use std::time::Duration;

use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::FetchResponse;
use kafka_protocol::messages::InitProducerIdRequest;
use kafka_protocol::messages::InitProducerIdResponse;
use kafka_protocol::messages::ListOffsetsRequest;
use kafka_protocol::messages::ListOffsetsResponse;
use kafka_protocol::messages::ProduceRequest;
use kafka_protocol::messages::ProduceResponse;
use kafka_protocol::messages::ProducerId;
use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::list_offsets_response::ListOffsetsPartitionResponse;
use kafka_protocol::messages::list_offsets_response::ListOffsetsTopicResponse;
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::produce_response::TopicProduceResponse;
use kafka_protocol::protocol::StrBytes;

use super::codes;
use super::records;
use eddy_raft::NodeId;

use crate::error::BrokerError;
use crate::partition::handle::Fetched;
use crate::partition::handle::OffsetSpec;
use crate::service::BrokerState;
use crate::service::data::Fetch;
use crate::service::data::Produce;

/// Kafka producer ids are Eddy producer ids (from the metadata group's allocator), at most this.
const KAFKA_PRODUCER_ID_MAX: i64 = (1 << 47) - 1;

/// The identity an idempotent Kafka producer has in Eddy's partitions: its producer id and
/// epoch, tagged so that it never equals an id a gRPC producer uses. A new epoch (a producer
/// that reset its sequences, KIP-360) is a new producer there and starts at sequence 0, as in
/// Kafka.
fn eddy_producer(producer_id: i64, epoch: i16) -> Option<u64> {
    if producer_id < 0 {
        return Some(0);
    }
    (producer_id <= KAFKA_PRODUCER_ID_MAX && epoch >= 0)
        .then(|| (1 << 63) | ((producer_id as u64) << 16) | u64::from(epoch as u16))
}

/// Answers a produce request; `None` for acks=0, which gets no response.
pub async fn produce(
    broker: &BrokerState,
    caller: &Caller,
    req: ProduceRequest,
    version: i16,
) -> Option<ProduceResponse> {
    let acks = req.acks;
    let timeout_ms = u32::try_from(req.timeout_ms).unwrap_or(0);
    let max_records = broker.limits.max_batch_records as usize;
    let transactional = req.transactional_id.is_some();
    let mut work = Vec::new();
    for t in req.topic_data {
        for p in t.partition_data {
            work.push((t.name.clone(), p.index, p.records));
        }
    }
    // Partitions are independent: their Raft rounds run at once.
    let answers = futures::future::join_all(work.into_iter().map(|(topic, index, data)| async move {
        let mut r = PartitionProduceResponse::default();
        r.index = index;
        let outcome = if !matches!(acks, -1..=1) {
            Err((codes::INVALID_REQUIRED_ACKS, format!("acks={acks}: only -1 (all), 0 and 1 are valid")))
        } else if transactional {
            Err((codes::INVALID_REQUEST, "transactional produce is not supported".to_owned()))
        } else if let Err(e) = caller.check(Operation::Write, ResourceType::Topic, topic.as_str()) {
            Err((codes::TOPIC_AUTHORIZATION_FAILED, e.to_string()))
        } else {
            produce_partition(broker, &topic, index, data, max_records, timeout_ms).await
        };
        match outcome {
            Ok(base_offset) => r.base_offset = base_offset,
            Err((code, message)) => {
                r.error_code = code;
                r.base_offset = -1;
                if version >= 8 {
                    r.error_message = Some(StrBytes::from_string(message));
                }
            }
        }
        (topic, r)
    }))
    .await;
    if acks == 0 {
        return None;
    }
    let mut out = ProduceResponse::default();
    for (topic, r) in answers {
        match out.responses.last_mut() {
            Some(t) if t.name == topic => t.partition_responses.push(r),
            _ => {
                let mut t = TopicProduceResponse::default();
                t.name = topic;
                t.partition_responses.push(r);
                out.responses.push(t);
            }
        }
    }
    Some(out)
}

/// Produces one partition's batch; its base offset, or the error code and message.
async fn produce_partition(
    broker: &BrokerState,
    topic: &str,
    index: i32,
    data: Option<bytes::Bytes>,
    max_records: usize,
    timeout_ms: u32,
) -> Result<i64, (i16, String)> {
    let Ok(partition) = u32::try_from(index) else {
        return Err((codes::UNKNOWN_TOPIC_OR_PARTITION, format!("partition {index} does not exist")));
    };
    let decompressed_max = broker.limits.max_request_bytes as usize;
    let mut batches = records::decode_produced(data.unwrap_or_default(), max_records, decompressed_max)
        .map_err(|e| (e.code(), e.to_string()))?;
    // Kafka's rule for format v2: exactly one batch per partition in a request.
    if batches.len() != 1 {
        return Err((
            codes::INVALID_RECORD,
            format!(
                "{} record batches for one partition; a produce request carries exactly one",
                batches.len()
            ),
        ));
    }
    let batch = batches.remove(0);
    let Some(producer_id) = eddy_producer(batch.producer_id, batch.producer_epoch) else {
        return Err((
            codes::UNKNOWN_PRODUCER_ID,
            format!("producer id {} epoch {} was not issued here", batch.producer_id, batch.producer_epoch),
        ));
    };
    let base_sequence = if producer_id == 0 {
        0
    } else {
        u64::try_from(batch.base_sequence).map_err(|_| {
            (codes::INVALID_RECORD, format!("base sequence {} is negative", batch.base_sequence))
        })?
    };
    let req = Produce {
        topic: topic.to_owned(),
        partition: Some(partition),
        records: batch.records,
        producer_id,
        base_sequence,
        timeout_ms,
    };
    match broker.produce(req).await {
        Ok(o) => {
            if !o.produced.duplicate {
                broker.metrics.kafka_produce_records.inc_by(u64::from(o.produced.count));
            }
            Ok(o.produced.base_offset as i64)
        }
        Err(e) => Err((codes::code(&e), e.to_string())),
    }
}

/// One partition of a fetch, as asked.
struct Wanted {
    topic: String,
    partition: i32,
    offset: i64,
    max_bytes: i32,
}

/// Answers a fetch: when the partitions together have less than `min_bytes`, waits up to
/// `max_wait_ms` for any of them to get a record, then reads them all again. Each partition is read from
/// this node's replica up to its commit point.
pub async fn fetch(broker: &BrokerState, caller: &Caller, req: FetchRequest, version: i16) -> FetchResponse {
    let wanted: Vec<Wanted> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| Wanted {
                topic: t.topic.as_str().to_owned(),
                partition: p.partition,
                offset: p.fetch_offset,
                // No partition may fill more than the whole answer may hold; the first with
                // records still gets at least one (the read always returns one).
                max_bytes: p.partition_max_bytes.min(req.max_bytes.max(1)),
            })
        })
        .collect();
    // KIP-392: a leader sends a consumer in another rack to a caught-up replica in its rack.
    let redirect: Vec<Option<NodeId>> = wanted
        .iter()
        .map(|w| {
            let partition = u32::try_from(w.partition).ok()?;
            (version >= 11 && !req.rack_id.is_empty())
                .then(|| broker.read_replica_in_rack(&w.topic, partition, req.rack_id.as_str()))
                .flatten()
        })
        .collect();
    let redirected = redirect.iter().any(Option::is_some);
    let max_wait = if redirected {
        Duration::ZERO
    } else {
        Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0))
    };
    let mut read = read_all(broker, caller, &wanted, Duration::ZERO).await;
    beyond_end(broker, &wanted, &mut read);
    let bytes: usize =
        read.iter().filter_map(|r| r.as_ref().ok()).flat_map(|f| &f.records).map(|r| r.record.size()).sum();
    let any_error = read.iter().any(Result::is_err);
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0);
    if !max_wait.is_zero() && !any_error && bytes < min_bytes {
        // Wait until any partition has records past what was read, or the time is up; then
        // read them all again.
        let mut waits: FuturesUnordered<_> = wanted
            .iter()
            .zip(&read)
            .filter_map(|(w, r)| {
                let next = r.as_ref().ok()?.next_offset;
                Some(fetch_one(broker, caller, w, next as i64, max_wait))
            })
            .collect();
        let deadline = tokio::time::sleep(max_wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                r = waits.next() => match r {
                    None => break,
                    Some(Ok(f)) if !f.records.is_empty() => break,
                    Some(_) => {}
                },
            }
        }
        drop(waits);
        read = read_all(broker, caller, &wanted, Duration::ZERO).await;
        beyond_end(broker, &wanted, &mut read);
    }
    let mut out = FetchResponse::default();
    let mut budget = usize::try_from(req.max_bytes).unwrap_or(0).max(1);
    let mut first = true;
    for ((w, r), redirect) in wanted.iter().zip(read).zip(redirect) {
        let mut pd = PartitionData::default();
        pd.partition_index = w.partition;
        match r {
            Ok(f) => {
                pd.high_watermark = f.high_watermark as i64;
                pd.last_stable_offset = f.high_watermark as i64;
                pd.log_start_offset = f.log_start_offset as i64;
                if let Some(replica) = redirect {
                    // No records: the client reads them from `replica` from now on.
                    pd.preferred_read_replica = super::metadata::broker_id(replica);
                    broker.metrics.kafka_read_replica_redirects.inc();
                    push_partition(&mut out, &w.topic, pd);
                    continue;
                }
                let size: usize = f.records.iter().map(|r| r.record.size()).sum();
                // The first partition with records is answered whatever its size (a consumer
                // must be able to make progress); the others while the request's limit allows.
                if !f.records.is_empty() && (first || size <= budget) {
                    first = false;
                    budget = budget.saturating_sub(size);
                    let log_append = broker.topic(&w.topic).is_ok_and(|t| t.log_append_time());
                    pd.records = Some(records::encode_fetched(&f.records, log_append));
                    broker.metrics.kafka_fetch_records.inc_by(f.records.len() as u64);
                }
            }
            Err(e) => {
                pd.error_code = codes::code(&e);
                pd.high_watermark = -1;
                if let BrokerError::OffsetOutOfRange { log_start, .. } = e {
                    pd.log_start_offset = log_start as i64;
                }
            }
        }
        push_partition(&mut out, &w.topic, pd);
    }
    out
}

/// Adds a partition's answer under its topic (partitions of a topic are asked together).
fn push_partition(out: &mut FetchResponse, topic: &str, pd: PartitionData) {
    match out.responses.last_mut() {
        Some(t) if t.topic.as_str() == topic => t.partitions.push(pd),
        _ => {
            let mut t = FetchableTopicResponse::default();
            t.topic = kafka_protocol::messages::TopicName(StrBytes::from_string(topic.to_owned()));
            t.partitions.push(pd);
            out.responses.push(t);
        }
    }
}

/// A position past the end of the log is `OFFSET_OUT_OF_RANGE`, as in Kafka (the consumer
/// applies `auto.offset.reset`, or, reading from a follower, goes back to the leader), where
/// the replica knows it to be past the end; otherwise it is read as the end (a long poll).
fn beyond_end(broker: &BrokerState, wanted: &[Wanted], read: &mut [Result<Fetched, BrokerError>]) {
    for (w, r) in wanted.iter().zip(read.iter_mut()) {
        let Ok(f) = r else { continue };
        let (Ok(partition), Ok(offset)) = (u32::try_from(w.partition), u64::try_from(w.offset)) else {
            continue;
        };
        if f.records.is_empty() && offset > f.high_watermark && broker.past_end(&w.topic, partition, offset) {
            *r = Err(BrokerError::OffsetOutOfRange {
                what: format!("{}/{partition}", w.topic),
                offset,
                log_start: f.log_start_offset,
            });
        }
    }
}

async fn read_all(
    broker: &BrokerState,
    caller: &Caller,
    wanted: &[Wanted],
    wait: Duration,
) -> Vec<Result<Fetched, BrokerError>> {
    futures::future::join_all(wanted.iter().map(|w| fetch_one(broker, caller, w, w.offset, wait))).await
}

async fn fetch_one(
    broker: &BrokerState,
    caller: &Caller,
    w: &Wanted,
    offset: i64,
    wait: Duration,
) -> Result<Fetched, BrokerError> {
    caller.check(Operation::Read, ResourceType::Topic, &w.topic)?;
    let (Ok(partition), Ok(offset)) = (u32::try_from(w.partition), u64::try_from(offset)) else {
        return Err(BrokerError::InvalidArgument(format!(
            "partition {} offset {offset}: negative values are not valid",
            w.partition
        )));
    };
    broker
        .fetch(Fetch {
            topic: w.topic.clone(),
            partition,
            offset,
            max_bytes: u32::try_from(w.max_bytes).unwrap_or(0).max(1),
            max_records: 0,
            max_wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        })
        .await
}

/// Answers `ListOffsets`: -2 is the log start, -1 the high watermark, anything else a timestamp.
pub fn list_offsets(
    broker: &BrokerState,
    caller: &Caller,
    req: ListOffsetsRequest,
    _version: i16,
) -> ListOffsetsResponse {
    let mut out = ListOffsetsResponse::default();
    for t in req.topics {
        let mut topic = ListOffsetsTopicResponse::default();
        for p in t.partitions {
            let mut r = ListOffsetsPartitionResponse::default();
            r.partition_index = p.partition_index;
            let spec = match p.timestamp {
                -2 => Some(OffsetSpec::Earliest),
                -1 => Some(OffsetSpec::Latest),
                ts if ts >= 0 => Some(OffsetSpec::Timestamp(ts)),
                _ => None,
            };
            let allowed = caller.check(Operation::Describe, ResourceType::Topic, t.name.as_str());
            let found = match (spec, u32::try_from(p.partition_index)) {
                _ if let Err(e) = allowed => Err(e),
                (Some(spec), Ok(partition)) => {
                    broker.list_offset(t.name.as_str(), partition, spec).map(|l| (spec, l))
                }
                (None, _) => {
                    Err(BrokerError::InvalidArgument(format!("timestamp {} is not supported", p.timestamp)))
                }
                (_, Err(_)) => Err(BrokerError::UnknownPartition {
                    topic: t.name.as_str().to_owned(),
                    partition: u32::MAX,
                    count: 0,
                }),
            };
            match found {
                // No record at or after the timestamp: Kafka answers -1 (a consumer seeks to
                // the end).
                Ok((OffsetSpec::Timestamp(_), l)) => {
                    if let Some(ts) = l.timestamp_ms {
                        r.offset = l.offset as i64;
                        r.timestamp = ts;
                    }
                }
                Ok((_, l)) => r.offset = l.offset as i64,
                Err(e) => r.error_code = codes::code(&e),
            }
            topic.partitions.push(r);
        }
        topic.name = t.name;
        out.topics.push(topic);
    }
    out
}

/// Answers `InitProducerId` for an idempotent producer (Kafka transactions are not supported):
/// a new producer id from the metadata group, epoch 0.
pub async fn init_producer_id(broker: &BrokerState, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut out = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        out.error_code = codes::INVALID_REQUEST;
        return out;
    }
    match broker.init_producer().await {
        Ok(id) if i64::try_from(id).is_ok_and(|id| id <= KAFKA_PRODUCER_ID_MAX) => {
            out.producer_id = ProducerId(id as i64);
            out.producer_epoch = 0;
        }
        Ok(id) => {
            tracing::error!(id, "producer id beyond what Kafka producers can carry");
            out.error_code = codes::UNKNOWN_SERVER_ERROR;
        }
        Err(e) => out.error_code = codes::code(&e),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::eddy_producer;

    #[test]
    fn kafka_producers_never_share_an_identity_with_grpc_producers_or_other_epochs() {
        assert_eq!(eddy_producer(-1, -1), Some(0), "no idempotence");
        let a = eddy_producer(7, 0).expect("valid");
        let b = eddy_producer(7, 1).expect("valid");
        assert_ne!(a, b, "a new epoch is a new producer");
        assert!(a >= 1 << 63, "gRPC producer ids are small numbers from the same allocator");
        assert_eq!(eddy_producer(1 << 47, 0), None);
        assert_eq!(eddy_producer(7, -1), None);
    }
}
