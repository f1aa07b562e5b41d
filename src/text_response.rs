//! The one-line plain-text answers of the small servers (admin and webhook): their routes differ,
//! the shape of an answer does not.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

/// A `text/plain` response; a missing final newline is added.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
