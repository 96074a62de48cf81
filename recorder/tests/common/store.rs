//! An object store that passes every call through to another and lets a test act around each
//! put: hold a write back, or note what was written. Shared by the integration tests and the
//! crate's unit tests (`src/tests.rs`).
#![allow(dead_code)]

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// A store call's boxed future.
type Fut<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

/// What a [`Hooked`] store does around each put.
pub(crate) trait PutHook: fmt::Debug + Send + Sync + 'static {
    /// Runs before `location` is written; the write waits for it.
    fn before<'a>(&'a self, _location: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Sees what writing `location` returned.
    fn after(&self, _location: &Path, _result: &object_store::Result<PutResult>) {}
}

/// A store that passes every call to `inner`, and each put through `hook`.
#[derive(Debug)]
pub(crate) struct Hooked<H> {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) hook: H,
}

impl<H: PutHook> Hooked<H> {
    /// `inner`, its puts going through `hook`.
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, hook: H) -> Arc<Self> {
        Arc::new(Self { inner, hook })
    }
}

impl<H> fmt::Display for Hooked<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hooked({})", self.inner)
    }
}

impl<H: PutHook> ObjectStore for Hooked<H> {
    fn put_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Fut<'f, PutResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            self.hook.before(location).await;
            let result = self.inner.put_opts(location, payload, opts).await;
            self.hook.after(location, &result);
            result
        })
    }

    fn put_multipart_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l Path,
        opts: PutMultipartOptions,
    ) -> Fut<'f, Box<dyn MultipartUpload>>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.put_multipart_opts(location, opts))
    }

    fn get_opts<'s, 'l, 'f>(&'s self, location: &'l Path, options: GetOptions) -> Fut<'f, GetResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.get_opts(location, options))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_delimiter<'s, 'l, 'f>(&'s self, prefix: Option<&'l Path>) -> Fut<'f, ListResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.list_with_delimiter(prefix))
    }

    fn copy_opts<'s, 'a, 'b, 'f>(&'s self, from: &'a Path, to: &'b Path, options: CopyOptions) -> Fut<'f, ()>
    where
        's: 'f,
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.copy_opts(from, to, options))
    }
}
