//! The breaker's whole state in one `u64`, so every transition is a single
//! compare-and-swap.
//!
//! ```text
//! bits 0..2   state (0 closed, 1 open, 2 half-open)
//! bits 2..8   backoff level: open time = open_for << level, capped
//! bits 8..24  generation, bumped on every transition
//! bits 24..64 open: the deadline in ms since the breaker's origin (40 bits, 34 years)
//!             half-open: probes admitted (24..40) and probes succeeded (40..56)
//! ```

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Word {
    Closed {
        gen: u16,
    },
    Open {
        gen: u16,
        level: u8,
        until_ms: u64,
    },
    HalfOpen {
        gen: u16,
        level: u8,
        admitted: u16,
        succeeded: u16,
    },
}

pub(super) const MAX_LEVEL: u8 = 32;
pub(super) const UNTIL_MASK: u64 = (1 << 40) - 1;

impl Word {
    pub(super) fn encode(self) -> u64 {
        match self {
            Self::Closed { gen } => u64::from(gen) << 8,
            Self::Open {
                gen,
                level,
                until_ms,
            } => 1 | u64::from(level) << 2 | u64::from(gen) << 8 | until_ms.min(UNTIL_MASK) << 24,
            Self::HalfOpen {
                gen,
                level,
                admitted,
                succeeded,
            } => {
                2 | u64::from(level) << 2
                    | u64::from(gen) << 8
                    | u64::from(admitted) << 24
                    | u64::from(succeeded) << 40
            }
        }
    }

    pub(super) fn decode(word: u64) -> Self {
        let level = ((word >> 2) & 0x3f) as u8;
        let gen = (word >> 8) as u16;
        match word & 3 {
            0 => Self::Closed { gen },
            1 => Self::Open {
                gen,
                level,
                until_ms: word >> 24,
            },
            _ => Self::HalfOpen {
                gen,
                level,
                admitted: (word >> 24) as u16,
                succeeded: (word >> 40) as u16,
            },
        }
    }

    pub(super) fn gen(self) -> u16 {
        match self {
            Self::Closed { gen } | Self::Open { gen, .. } | Self::HalfOpen { gen, .. } => gen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_round_trips() {
        for word in [
            Word::Closed { gen: 65535 },
            Word::Open {
                gen: 7,
                level: 32,
                until_ms: UNTIL_MASK,
            },
            Word::HalfOpen {
                gen: 1,
                level: 3,
                admitted: 65535,
                succeeded: 65534,
            },
        ] {
            assert_eq!(Word::decode(word.encode()), word);
        }
    }
}
