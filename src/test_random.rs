//! A small deterministic pseudo-random generator for the fuzzing unit
//! tests (xorshift64): the same seed gives the same inputs on every run,
//! so a failure can be replayed, and no crate is needed for it.

pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut state = self.0;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        self.0 = state;
        state
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}
