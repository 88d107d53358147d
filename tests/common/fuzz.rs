//! Shared by the fuzz tests: case counts scaled by `QR_FUZZ_CASES`, and a small seeded RNG for the
//! plain generated-input loops (proptest drives the rest).

/// The CI case count of the reference target (ATerm mutations of the fixture drvs). Every fuzz
/// target scales its own CI count by `QR_FUZZ_CASES / REFERENCE_CASES`.
pub const REFERENCE_CASES: u64 = 4000;

/// `QR_FUZZ_CASES / REFERENCE_CASES` (1 when unset). A value that is not a positive integer fails
/// the test rather than silently running the CI size.
pub fn scale() -> f64 {
    match std::env::var("QR_FUZZ_CASES") {
        Ok(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .unwrap_or_else(|| panic!("QR_FUZZ_CASES={v:?}: expected a positive integer"));
            n as f64 / REFERENCE_CASES as f64
        }
        Err(_) => 1.0,
    }
}

/// A target's case count: its CI count scaled by [`scale`], at least 1.
pub fn cases(ci: u32) -> u32 {
    ((ci as f64 * scale()).round() as u64).clamp(1, u32::MAX as u64) as u32
}

/// The seed of the plain loops: `QR_FUZZ_SEED`, else the time. Printed so a failure can be
/// replayed (`QR_FUZZ_SEED=<n>`).
pub fn seed(target: &str) -> u64 {
    let s = match std::env::var("QR_FUZZ_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("QR_FUZZ_SEED={v:?}: expected an integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("{target}: QR_FUZZ_SEED={s}");
    s
}

/// SplitMix64: small, fast, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A string of `n` characters mixing ASCII, punctuation that needs escaping and non-ASCII.
    pub fn string(&mut self, n: usize) -> String {
        const CHARS: &[char] = &[
            'a', 'z', '0', '9', '-', '_', '.', '/', ':', '"', '\\', '\n', '\t', ' ', 'é', '€',
            '😀', '\u{0}', '\u{7f}', '[', ']', '(', ')', ',',
        ];
        (0..n).map(|_| *self.pick(CHARS)).collect()
    }

    /// A length that is usually small and sometimes absurd (for "declared size" fields).
    pub fn wild_len(&mut self) -> u64 {
        match self.below(8) {
            0 => u64::MAX,
            1 => u64::MAX / 2 + 1,
            2 => 1 << (32 + self.below(31)),
            3 => (1 << 20) + self.below(1 << 20) as u64,
            4 => self.below(4096) as u64,
            _ => self.below(64) as u64,
        }
    }
}
