//! Helpers shared by the broker's own randomized tests (unit and
//! integration); not part of the broker's interface.

use rand::SeedableRng;

/// A random generator seeded from `KEELMQ_TEST_SEED` when set, otherwise
/// from a fresh random seed; the seed is printed so a failure can be
/// repeated.
pub fn seeded_rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("KEELMQ_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set KEELMQ_TEST_SEED to repeat)");
    rand::rngs::StdRng::seed_from_u64(seed)
}
