//! A minimal gRPC unary caller for the load tool, on the `h2` crate.
//!
//! `keelmq bench send` measures the endpoint, so its own cost per request
//! should be small: client and broker share the machine. A tonic channel
//! passes each call through a buffer task and hyper's dispatch and response
//! tasks; here the sender's own task opens the stream, writes the encoded
//! request and reads the reply, and one task per connection drives the
//! connection. Only plaintext HTTP/2 (the endpoints the tool measures listen
//! for it) and uncompressed messages.

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};

use crate::coalesce::Coalescing;

/// Largest reply accepted (the broker's own inbound limit is larger; a
/// reply to a send is a few hundred bytes per message).
const MAX_REPLY: usize = 64 << 20;

/// One HTTP/2 connection; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct UnaryConn {
    send: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
    headers: HeaderMap,
}

impl UnaryConn {
    /// Connects to `host:port` and starts the task that drives the
    /// connection. `client_id` goes in the `x-mq-client-id` header of every
    /// call.
    pub async fn connect(endpoint: &str, client_id: &str) -> Result<Self> {
        let uri: Uri = format!("http://{endpoint}")
            .parse()
            .with_context(|| format!("endpoint {endpoint:?}"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| anyhow!("endpoint {endpoint:?} has no host"))?;
        let (host, port) = host_port(&uri);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        tcp.set_nodelay(true)?;
        // Requests issued in one scheduler turn share a write, as the
        // broker's responses do.
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(1 << 20)
            .handshake::<_, Bytes>(Coalescing::new(tcp))
            .await
            .with_context(|| format!("HTTP/2 handshake with {endpoint}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "bench connection ended");
            }
        });
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert(
            "x-mq-client-id",
            HeaderValue::from_str(client_id).context("client id")?,
        );
        Ok(UnaryConn {
            send,
            authority,
            headers,
        })
    }

    /// The request URI of the method at `path` (`/package.Service/Method`)
    /// on this connection, built once for all calls to it.
    pub fn rpc(&self, path: &str) -> Result<Uri> {
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .with_context(|| format!("request uri for {path}"))
    }

    /// Calls the method at `rpc` (from [`UnaryConn::rpc`]) with `req` and
    /// decodes the reply. A gRPC status other than OK is an error carrying
    /// its code and message.
    pub async fn call<Q: prost::Message, R: prost::Message + Default>(
        &self,
        rpc: &Uri,
        req: &Q,
    ) -> Result<R> {
        let len = req.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).context("request too large")?);
        req.encode(&mut buf).context("encoding the request")?;

        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = rpc.clone();
        *request.headers_mut() = self.headers.clone();

        let mut send = self.send.clone().ready().await.context("connection")?;
        let (reply, mut stream) = send.send_request(request, false).context("sending")?;
        stream.send_data(buf.freeze(), true).context("sending")?;
        let reply = reply.await.context("awaiting the reply")?;
        if reply.status() != http::StatusCode::OK {
            bail!("HTTP status {}", reply.status());
        }
        // A failure may come as headers only.
        check_grpc_status(reply.headers())?;
        let mut body = reply.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("reading the reply")?;
            let n = chunk.len();
            if data.len() + n > MAX_REPLY {
                bail!("reply larger than {MAX_REPLY} bytes");
            }
            data.extend_from_slice(&chunk);
            let _ = body.flow_control().release_capacity(n);
        }
        if let Some(trailers) = body.trailers().await.context("reading the trailers")? {
            check_grpc_status(&trailers)?;
        }
        decode_frame(data.freeze())
    }
}

/// Where to connect for `uri` (an IPv6 host loses its brackets).
pub fn host_port(uri: &Uri) -> (&str, u16) {
    let host = uri.host().unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, uri.port_u16().unwrap_or(80))
}

/// Fails on a `grpc-status` other than 0 (absent is fine: it comes in the
/// trailers then).
fn check_grpc_status(h: &HeaderMap) -> Result<()> {
    match h.get("grpc-status").map(|v| v.to_str().unwrap_or("?")) {
        None | Some("0") => Ok(()),
        Some(code) => {
            let msg = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            bail!("gRPC status {code}: {msg}")
        }
    }
}

/// Decodes one length-prefixed, uncompressed gRPC message.
fn decode_frame<R: prost::Message + Default>(mut data: Bytes) -> Result<R> {
    if data.len() < 5 {
        bail!("reply of {} bytes has no gRPC message", data.len());
    }
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    if compressed != 0 {
        bail!("compressed reply (not supported)");
    }
    if data.len() != len {
        bail!("reply frame says {len} bytes, {} came", data.len());
    }
    R::decode(data).context("decoding the reply")
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelmq_proto::rocketmq::v2 as pb;

    fn frame(msg: &impl prost::Message) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(0);
        b.put_u32(msg.encoded_len() as u32);
        msg.encode(&mut b).expect("encode");
        b.freeze()
    }

    #[test]
    fn decodes_a_framed_reply_and_rejects_bad_frames() {
        let status = pb::Status {
            code: pb::Code::Ok as i32,
            message: "OK".into(),
        };
        let got: pb::Status = decode_frame(frame(&status)).expect("decodes");
        assert_eq!(got, status);

        let whole = frame(&status);
        assert!(decode_frame::<pb::Status>(whole.slice(..3)).is_err());
        assert!(decode_frame::<pb::Status>(whole.slice(..whole.len() - 1)).is_err());
        let mut compressed = BytesMut::from(&whole[..]);
        compressed[0] = 1;
        assert!(decode_frame::<pb::Status>(compressed.freeze()).is_err());
    }

    #[test]
    fn grpc_status_in_headers_or_trailers() {
        let mut h = HeaderMap::new();
        assert!(check_grpc_status(&h).is_ok());
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(check_grpc_status(&h).is_ok());
        h.insert("grpc-status", HeaderValue::from_static("12"));
        h.insert("grpc-message", HeaderValue::from_static("unimplemented"));
        let e = check_grpc_status(&h).expect_err("non-zero status");
        assert!(e.to_string().contains("12") && e.to_string().contains("unimplemented"));
    }

    #[test]
    fn connects_to_the_endpoint_host_and_port() {
        let at = |s: &str| {
            let uri: Uri = s.parse().expect("uri");
            let (h, p) = host_port(&uri);
            (h.to_owned(), p)
        };
        assert_eq!(at("http://127.0.0.1:8081"), ("127.0.0.1".into(), 8081));
        assert_eq!(at("http://[::1]:9876"), ("::1".into(), 9876));
        assert_eq!(at("http://broker.local"), ("broker.local".into(), 80));
    }
}
