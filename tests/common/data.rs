//! Test data without a crate: reproducible pseudo-random bytes and a
//! digest cheap enough to run over hundreds of megabytes in a debug build.

/// xorshift64: the same pseudo-random bytes for the same seed (which must
/// not be 0).
pub struct Random(pub u64);

impl Random {
    /// Fills `buffer` with the next bytes, 8 (little-endian) per step; a
    /// short last chunk takes the low bytes of its step.
    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// FNV-1a over 64-bit little-endian words (the tail zero-padded), plus the
/// length: fast enough in a debug build, and any lost, doubled or
/// reordered word changes it. Chunk boundaries do not matter: the bytes
/// are digested as one stream.
pub struct Digest {
    hash: u64,
    length: u64,
    pending: Vec<u8>,
}

impl Digest {
    pub fn new() -> Digest {
        Digest { hash: 0xcbf2_9ce4_8422_2325, length: 0, pending: Vec::with_capacity(8) }
    }

    fn word(&mut self, word: u64) {
        self.hash = (self.hash ^ word).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Adds the next `bytes` of the stream.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.length += bytes.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < 8 {
                return;
            }
            let word = u64::from_le_bytes(self.pending[..].try_into().unwrap());
            self.word(word);
            self.pending.clear();
        }
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.word(u64::from_le_bytes(word.try_into().unwrap()));
        }
        self.pending.extend_from_slice(words.remainder());
    }

    /// `(length, hash)` of everything added.
    pub fn finish(mut self) -> (u64, u64) {
        if !self.pending.is_empty() {
            let mut word = [0u8; 8];
            word[..self.pending.len()].copy_from_slice(&self.pending);
            self.word(u64::from_le_bytes(word));
        }
        (self.length, self.hash)
    }
}
