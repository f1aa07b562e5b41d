//! ChunkedTracker on arbitrary bytes: never panics, any split gives the answer of the whole, and
//! the end it finds is exact (the body up to it is complete, one byte less is not).
#![no_main]

use amazing_proxy::proxy::http1::chunked::{ChunkedTracker, InvalidChunk};
use libfuzzer_sys::fuzz_target;

fn whole(body: &[u8]) -> Result<Option<usize>, InvalidChunk> {
    ChunkedTracker::default().advance(body)
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose where to split the rest.
    let (seeds, body) = data.split_at(data.len().min(3));
    let expected = whole(body);

    let mut tracker = ChunkedTracker::default();
    let mut start = 0;
    let mut split = Ok(None);
    for &seed in seeds.iter().chain(std::iter::once(&u8::MAX)) {
        let cut = (start + usize::from(seed)).min(body.len());
        let cut = if seed == u8::MAX { body.len() } else { cut };
        match tracker.advance(&body[start..cut]) {
            Ok(Some(n)) => {
                split = Ok(Some(start + n));
                break;
            }
            Ok(None) => start = cut,
            Err(e) => {
                split = Err(e);
                break;
            }
        }
    }
    assert_eq!(split, expected, "split at {seeds:?}");

    if let Ok(Some(end)) = expected {
        assert!(end > 0 && end <= body.len());
        assert_eq!(whole(&body[..end]), Ok(Some(end)));
        assert_eq!(whole(&body[..end - 1]), Ok(None));
    }
});
