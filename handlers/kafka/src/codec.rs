//! The sans-IO Kafka frame and request codec.
//!
//! A Kafka frame is a 4-byte big-endian length followed by that many bytes.
//! [`decode_frame`] takes a frame off the front of a buffer, answering "need
//! more bytes" with `Ok(None)` and refusing a length above the configured
//! maximum before anything is allocated. [`parse_request`] turns a frame
//! into a request header and body (bodies are decoded by the
//! `kafka-protocol` crate), and [`encode_response`] writes a response frame.
//!
//! The set of APIs and versions Manifold answers is [`SUPPORTED_APIS`]:
//! ApiVersions advertises exactly this table.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::{decode_request_header_from_buffer, Encodable};

/// Every API Manifold implements, with the versions it implements:
/// `(api, min, max)`. ApiVersions answers exactly this.
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 11),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
];

/// A short, bounded name of a supported API (a metrics label value).
pub fn api_name(api: ApiKey) -> &'static str {
    match api {
        ApiKey::Produce => "produce",
        ApiKey::Fetch => "fetch",
        ApiKey::ListOffsets => "list_offsets",
        ApiKey::Metadata => "metadata",
        ApiKey::OffsetCommit => "offset_commit",
        ApiKey::OffsetFetch => "offset_fetch",
        ApiKey::FindCoordinator => "find_coordinator",
        ApiKey::JoinGroup => "join_group",
        ApiKey::Heartbeat => "heartbeat",
        ApiKey::LeaveGroup => "leave_group",
        ApiKey::SyncGroup => "sync_group",
        ApiKey::DescribeGroups => "describe_groups",
        ApiKey::ListGroups => "list_groups",
        ApiKey::ApiVersions => "api_versions",
        ApiKey::CreateTopics => "create_topics",
        ApiKey::DeleteTopics => "delete_topics",
        ApiKey::DeleteRecords => "delete_records",
        ApiKey::InitProducerId => "init_producer_id",
        ApiKey::OffsetForLeaderEpoch => "offset_for_leader_epoch",
        ApiKey::DescribeConfigs => "describe_configs",
        ApiKey::AlterConfigs => "alter_configs",
        ApiKey::CreatePartitions => "create_partitions",
        ApiKey::DeleteGroups => "delete_groups",
        ApiKey::IncrementalAlterConfigs => "incremental_alter_configs",
        ApiKey::DescribeCluster => "describe_cluster",
        _ => "other",
    }
}

/// The versions of `api` Manifold implements.
pub fn supported_versions(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == api)
        .map(|&(_, lo, hi)| (lo, hi))
}

/// Why a frame could not be taken off the buffer; the connection closes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is above the configured maximum.
    #[error("frame of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge { size: i64, max: usize },
    /// The length prefix is negative or too small to hold a header.
    #[error("invalid frame length {0}")]
    InvalidLength(i32),
}

/// Most buffer space reserved ahead of the bytes received.
const READ_AHEAD: usize = 1024 * 1024;

/// Smallest request: api key, api version and correlation id.
const MIN_REQUEST: usize = 8;

/// Takes one frame off the front of `buf`. `Ok(None)` means more bytes are
/// needed; nothing is consumed then.
///
/// # Errors
/// [`FrameError`] for a length that is negative, too small or above `max`.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < MIN_REQUEST as i32 {
        return Err(FrameError::InvalidLength(len));
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            size: len as i64,
            max,
        });
    }
    if buf.len() < 4 + len {
        // Grow with the data actually received, not with what the length
        // prefix claims: four bytes must not buy a 100 MiB allocation.
        buf.reserve((4 + len - buf.len()).min(READ_AHEAD));
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// A request frame, parsed as far as it can be.
#[derive(Debug)]
pub enum Parsed {
    /// A supported API at a supported version, decoded.
    Request {
        header: RequestHeader,
        api: ApiKey,
        body: Box<RequestKind>,
    },
    /// ApiVersions at a version outside the supported range (a newer
    /// client, usually). Kafka's rule (KIP-511) is to answer with a v0
    /// response carrying UNSUPPORTED_VERSION and the versions of
    /// ApiVersions it supports, so the client retries at a version both
    /// know. The rest of the request is not parsed: its header and body
    /// layout are those of a version we do not know.
    ApiVersionsUnsupported { correlation_id: i32 },
    /// An API key that is unknown or not implemented, or a version outside
    /// the supported range for any API but ApiVersions. Kafka closes the
    /// connection (it cannot answer in a format it does not know, and the
    /// client never sends a version ApiVersions did not advertise); so do
    /// we, after logging.
    Unsupported {
        api_key: i16,
        api_version: i16,
        correlation_id: i32,
    },
    /// The header or body did not decode.
    Malformed {
        api_key: i16,
        api_version: i16,
        correlation_id: i32,
        reason: String,
    },
}

/// Parses one request frame (as returned by [`decode_frame`]). Never panics.
pub fn parse_request(frame: Bytes) -> Parsed {
    if frame.len() < MIN_REQUEST {
        return Parsed::Malformed {
            api_key: -1,
            api_version: -1,
            correlation_id: -1,
            reason: "request shorter than its fixed header".into(),
        };
    }
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let api_version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let Ok(api) = ApiKey::try_from(api_key) else {
        return Parsed::Unsupported {
            api_key,
            api_version,
            correlation_id,
        };
    };
    let Some((lo, hi)) = supported_versions(api) else {
        return Parsed::Unsupported {
            api_key,
            api_version,
            correlation_id,
        };
    };
    if api_version < lo || api_version > hi {
        if api == ApiKey::ApiVersions {
            return Parsed::ApiVersionsUnsupported { correlation_id };
        }
        return Parsed::Unsupported {
            api_key,
            api_version,
            correlation_id,
        };
    }
    let mut body = frame;
    let malformed = |reason: String| Parsed::Malformed {
        api_key,
        api_version,
        correlation_id,
        reason,
    };
    let header = match decode_request_header_from_buffer(&mut body) {
        Ok(h) => h,
        Err(e) => return malformed(format!("request header: {e}")),
    };
    match RequestKind::decode(api, &mut body, api_version) {
        Ok(b) => Parsed::Request {
            header,
            api,
            body: Box::new(b),
        },
        Err(e) => malformed(format!("{api:?} v{api_version} body: {e}")),
    }
}

/// Writes one response frame (length, header, body) for a request of `api`
/// at `version`.
///
/// # Errors
/// A body that cannot be encoded at that version (a handler bug).
pub fn encode_response(
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    body: &ResponseKind,
) -> Result<Bytes, String> {
    let mut buf = BytesMut::with_capacity(256);
    encode_response_into(&mut buf, correlation_id, api, version, body)?;
    Ok(buf.freeze())
}

/// Like [`encode_response`], into `buf` (cleared first), so a connection
/// can reuse one buffer.
///
/// # Errors
/// The body does not encode at `version`.
pub fn encode_response_into(
    buf: &mut BytesMut,
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    body: &ResponseKind,
) -> Result<(), String> {
    buf.clear();
    buf.put_i32(0);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(buf, api.response_header_version(version))
        .map_err(|e| format!("response header: {e}"))?;
    body.encode(buf, version)
        .map_err(|e| format!("{api:?} v{version} response: {e}"))?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The ApiVersions response body listing [`SUPPORTED_APIS`].
pub fn api_versions_body(error_code: i16) -> ApiVersionsResponse {
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED_APIS
                .iter()
                .map(|&(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(k as i16)
                        .with_min_version(lo)
                        .with_max_version(hi)
                })
                .collect(),
        )
}

/// The v0 ApiVersions response (header v0, body v0) with
/// UNSUPPORTED_VERSION, for a client that asked with a version outside the
/// supported range. As in Kafka (KIP-511), the only entry is ApiVersions
/// itself: all the client needs to retry, and nothing it could mistake for
/// the full table.
pub fn encode_api_versions_fallback(correlation_id: i32) -> Bytes {
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    let (lo, hi) = supported_versions(ApiKey::ApiVersions).unwrap_or((0, 0));
    let body = ResponseKind::ApiVersions(
        ApiVersionsResponse::default()
            .with_error_code(mapping::kafka::ErrorCode::UnsupportedVersion.code())
            .with_api_keys(vec![ApiVersion::default()
                .with_api_key(ApiKey::ApiVersions as i16)
                .with_min_version(lo)
                .with_max_version(hi)]),
    );
    // v0 of ApiVersions always encodes; the table is small and static.
    encode_response(correlation_id, ApiKey::ApiVersions, 0, &body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use kafka_protocol::protocol::{encode_request_header_into_buffer, Decodable, StrBytes};
    use proptest::prelude::*;

    fn request_frame(api: ApiKey, version: i16, body: &RequestKind) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        let h = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("t")));
        encode_request_header_into_buffer(&mut buf, &h).unwrap();
        body.encode(&mut buf, version).unwrap();
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.freeze()
    }

    #[test]
    fn frames_need_more_bytes_then_decode() {
        let f = request_frame(
            ApiKey::ApiVersions,
            3,
            &RequestKind::ApiVersions(ApiVersionsRequest::default()),
        );
        for cut in 0..f.len() {
            let mut b = BytesMut::from(&f[..cut]);
            assert_eq!(decode_frame(&mut b, 1 << 20).unwrap(), None);
            assert_eq!(b.len(), cut, "nothing consumed while incomplete");
        }
        let mut b = BytesMut::from(&f[..]);
        let frame = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert!(b.is_empty());
        match parse_request(frame) {
            Parsed::Request { header, api, .. } => {
                assert_eq!(api, ApiKey::ApiVersions);
                assert_eq!(header.correlation_id, 7);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn oversized_and_negative_lengths_are_refused() {
        let mut b = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut b, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_frame(&mut b, 1024),
            Err(FrameError::InvalidLength(-1))
        );
    }

    #[test]
    fn versions_outside_the_table_are_unsupported() {
        let f = request_frame(
            ApiKey::Metadata,
            13,
            &RequestKind::Metadata(MetadataRequest::default()),
        );
        assert!(matches!(
            parse_request(f.slice(4..)),
            Parsed::Unsupported {
                api_version: 13,
                ..
            }
        ));
        let mut raw = BytesMut::new();
        raw.put_i16(18);
        raw.put_i16(9);
        raw.put_i32(5);
        assert!(matches!(
            parse_request(raw.freeze()),
            Parsed::ApiVersionsUnsupported { correlation_id: 5 }
        ));
        let mut raw = BytesMut::new();
        raw.put_i16(18);
        raw.put_i16(-1);
        raw.put_i32(6);
        assert!(matches!(
            parse_request(raw.freeze()),
            Parsed::ApiVersionsUnsupported { correlation_id: 6 }
        ));
    }

    #[test]
    fn api_versions_fallback_is_a_v0_response() {
        let f = encode_api_versions_fallback(9);
        let mut b = f.slice(4..);
        assert_eq!(b.get_i32(), 9);
        let r = ApiVersionsResponse::decode(&mut b, 0).unwrap();
        assert_eq!(r.error_code, 35);
        assert_eq!(r.api_keys.len(), 1);
        let v = &r.api_keys[0];
        assert_eq!((v.api_key, v.min_version, v.max_version), (18, 0, 4));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(Bytes::from(data));
        }

        #[test]
        fn parse_never_panics_on_valid_prefixes(api in 0usize..25, v in 0i16..14, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (key, lo, hi) = SUPPORTED_APIS[api % SUPPORTED_APIS.len()];
            let v = lo + v % (hi - lo + 1);
            let mut b = BytesMut::new();
            b.put_i16(key as i16);
            b.put_i16(v);
            b.put_i32(1);
            b.put_slice(&tail);
            let _ = parse_request(b.freeze());
        }
    }
}
