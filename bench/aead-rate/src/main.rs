//! Seals 16 KiB TLS 1.3 records (a full record's payload, in place, as rustls does) with the two
//! suites HBONE offers, on the core it is pinned to, and prints each rate in GB/s.
use std::time::{Duration, Instant};

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, LessSafeKey, Nonce, UnboundKey};

const RECORD: usize = 16 * 1024;
/// Long enough to leave the CPU's frequency ramp and the first cache misses behind.
const SPAN: Duration = Duration::from_secs(2);

fn seal_rate(algorithm: &'static Algorithm) -> f64 {
    let key = UnboundKey::new(algorithm, &vec![7; algorithm.key_len()])
        .expect("a key of the suite's length");
    let key = LessSafeKey::new(key);
    let mut record = vec![1u8; RECORD];
    let header = [23u8, 3, 3, 0x40, 0x11]; // application data, TLS 1.2 on the wire, 16 KiB + tag
    let start = Instant::now();
    let mut sealed = 0u64;
    while start.elapsed() < SPAN {
        for _ in 0..256 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&sealed.to_be_bytes());
            let nonce = Nonce::assume_unique_for_key(nonce);
            let tag = key.seal_in_place_separate_tag(nonce, Aad::from(header), &mut record);
            let _ = std::hint::black_box(tag.expect("a record under the AEAD's size limit"));
            sealed += 1;
        }
    }
    (sealed * RECORD as u64) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    println!("AES_256_GCM {:.2}", seal_rate(&AES_256_GCM));
    println!("AES_128_GCM {:.2}", seal_rate(&AES_128_GCM));
}
