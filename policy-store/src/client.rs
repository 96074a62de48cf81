//! Talking to the policy store: [`PolicyClient`] for policy commands, [`AdminClient`] for the
//! cluster, [`follow`] for proxies, [`diff`] to compare two versions' documents.

mod admin;
mod follow;

use proto::pb::policy_store_client::PolicyStoreClient;
use proto::pb::watch_event::Event;
use proto::pb::{
    ApplyRequest, ApplyResponse, GetRequest, HistoryRequest, PolicyVersion, WatchEvent, WatchRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

pub use admin::AdminClient;
pub use follow::{ActivePolicy, Follower, StalePolicy, follow, follow_with};

use crate::cluster::{CONSISTENCY_HEADER, LINEARIZABLE};
pub use crate::error::ClientError;

/// How long connecting to a store may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The most a client decodes in one answer: a `History` of many versions can be larger than
/// one version ([`crate::MAX_VERSION_BYTES`]).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// A gRPC client of one policy-store node. Every request carries the token it was made with
/// (`authorization: Bearer <token>`): reads need the read token or the admin token, `apply`
/// and `rollback` the admin token.
#[derive(Clone)]
pub struct PolicyClient {
    inner: PolicyStoreClient<Channel>,
    authorization: Bearer,
}

impl std::fmt::Debug for PolicyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyClient").finish_non_exhaustive()
    }
}

/// A token as the value of an `authorization` header.
pub(crate) type Bearer = MetadataValue<Ascii>;

/// `Bearer <token>`; an error when the token cannot be a header value.
pub(crate) fn bearer(token: &str) -> Result<Bearer, ClientError> {
    let mut value: Bearer = format!("Bearer {token}").parse().map_err(|_| ClientError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// `message` with the token.
pub(crate) fn authorized<T>(message: T, authorization: &Bearer) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", authorization.clone());
    request
}

pub(crate) fn endpoint(endpoint: &str, tls: &crate::ClientTls) -> Result<Endpoint, ClientError> {
    tls.endpoint(endpoint, CONNECT_TIMEOUT)
}

/// A connected channel to `endpoint`, and the `authorization` value for `token`.
pub(crate) async fn connect(
    endpoint: &str,
    token: &str,
    tls: &crate::ClientTls,
) -> Result<(Channel, Bearer), ClientError> {
    let authorization = bearer(token)?;
    let channel = self::endpoint(endpoint, tls)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect { endpoint: endpoint.to_string(), source })?;
    Ok((channel, authorization))
}

impl PolicyClient {
    /// Connect to a node, e.g. `"http://127.0.0.1:17070"`, with a token: the admin token to
    /// apply, the read token (or the admin token) to read.
    pub async fn connect(endpoint: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, token, &crate::ClientTls::default()).await
    }

    /// [`PolicyClient::connect`], checking an `https://` node's certificate as `tls` says.
    pub async fn connect_with(
        endpoint: &str,
        token: &str,
        tls: &crate::ClientTls,
    ) -> Result<Self, ClientError> {
        let (channel, authorization) = connect(endpoint, token, tls).await?;
        let inner = PolicyStoreClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
        Ok(Self { inner, authorization })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        authorized(message, &self.authorization)
    }

    /// Validate and store a YAML document (admin token). An invalid one fails with
    /// INVALID_ARGUMENT, whose message lists each error as "line N: path: message". The version
    /// records `author` as the caller's claim after the role that applied it
    /// (`admin-token:<author>`).
    pub async fn apply(&mut self, yaml: &str, author: &str) -> Result<ApplyResponse, ClientError> {
        let request =
            self.request(ApplyRequest { document_yaml: yaml.to_string(), author: author.to_string() });
        Ok(self.inner.apply(request).await?.into_inner())
    }

    /// One version with its document (0 = the latest). NOT_FOUND when there is no such version.
    pub async fn get(&mut self, version: u64) -> Result<PolicyVersion, ClientError> {
        Ok(self.inner.get(self.request(GetRequest { version })).await?.into_inner())
    }

    /// Like [`PolicyClient::get`], but linearizable: it reflects every write committed before
    /// the call, even when this node is a lagging follower (the read goes to the leader).
    pub async fn get_linearizable(&mut self, version: u64) -> Result<PolicyVersion, ClientError> {
        Ok(self.inner.get(linearizable(self.request(GetRequest { version }))).await?.into_inner())
    }

    /// Every version, oldest first, without document bodies (`document_yaml` is empty).
    pub async fn history(&mut self) -> Result<Vec<PolicyVersion>, ClientError> {
        Ok(self.inner.history(self.request(HistoryRequest {})).await?.into_inner().versions)
    }

    /// Like [`PolicyClient::history`], but linearizable.
    pub async fn history_linearizable(&mut self) -> Result<Vec<PolicyVersion>, ClientError> {
        let request = linearizable(self.request(HistoryRequest {}));
        Ok(self.inner.history(request).await?.into_inner().versions)
    }

    /// Apply version `version`'s document again, as a new version by `author`. The history keeps
    /// everything in between. Unchanged (`changed = false`) when it already is the latest.
    pub async fn rollback(&mut self, version: u64, author: &str) -> Result<ApplyResponse, ClientError> {
        if version == 0 {
            return Err(ClientError::Server(tonic::Status::invalid_argument("versions start at 1")));
        }
        let old = self.get_linearizable(version).await?;
        self.apply(&old.document_yaml, author).await
    }

    /// The versions after `from_version`, then each new one as it is committed. Heartbeats (and
    /// events this client does not know) are left out; see [`PolicyClient::watch_events`].
    pub async fn watch(
        &mut self,
        from_version: u64,
    ) -> Result<
        impl tokio_stream::Stream<Item = Result<PolicyVersion, ClientError>> + Send + Unpin + 'static,
        ClientError,
    > {
        use tokio_stream::StreamExt;
        let events = self.watch_events(from_version).await?;
        Ok(events.filter_map(|event| match event {
            Ok(WatchEvent { event: Some(Event::Version(v)) }) => Some(Ok(v)),
            Ok(_) => None,
            Err(status) => Some(Err(ClientError::from(status))),
        }))
    }

    /// The Watch stream as sent: versions, and a heartbeat each time the node confirmed with its
    /// raft quorum that it is current. It ends with UNAVAILABLE when the node cannot confirm.
    pub async fn watch_events(
        &mut self,
        from_version: u64,
    ) -> Result<tonic::Streaming<WatchEvent>, ClientError> {
        Ok(self.inner.watch(self.request(WatchRequest { from_version })).await?.into_inner())
    }
}

fn linearizable<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert(CONSISTENCY_HEADER, tonic::metadata::MetadataValue::from_static(LINEARIZABLE));
    request
}

/// A unified diff from `old` to `new` (labelled with their version numbers); empty when equal.
pub fn diff(old: &PolicyVersion, new: &PolicyVersion) -> String {
    if old.document_yaml == new.document_yaml {
        return String::new();
    }
    similar::TextDiff::from_lines(&old.document_yaml, &new.document_yaml)
        .unified_diff()
        .context_radius(3)
        .header(&format!("version {}", old.version), &format!("version {}", new.version))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u64, yaml: &str) -> PolicyVersion {
        PolicyVersion { version: n, document_yaml: yaml.into(), ..PolicyVersion::default() }
    }

    #[test]
    fn diff_shows_removed_and_added_lines_between_versions() {
        let d = diff(&version(1, "a: 1\nb: 2\n"), &version(2, "a: 1\nb: 3\n"));
        assert!(d.starts_with("--- version 1\n+++ version 2\n"), "{d}");
        assert!(d.contains("\n-b: 2\n+b: 3\n"), "{d}");
        assert_eq!(diff(&version(1, "a: 1\n"), &version(3, "a: 1\n")), "");
    }
}
