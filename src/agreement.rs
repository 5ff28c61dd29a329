//! Preview agreement (contract §12): how far the Flash answer (the preview) used the same
//! words as the Pro answer (the final one), as a number in [0, 1].
//!
//! The measure is the Dice coefficient over the two *bags* of words, which is ROUGE-1 F1:
//!
//! ```text
//! agreement = 2 · Σ_w min(count_flash(w), count_pro(w)) / (words_flash + words_pro)
//! ```
//!
//! A word is a maximal run of Unicode alphanumeric characters, lowercased; everything else
//! (punctuation, whitespace, Markdown markup, emoji) separates words and counts for nothing.
//! So answers that differ only in case, punctuation or spacing agree at 1.0, answers with no
//! word in common at 0.0.
//!
//! Why this measure:
//! - It says what operators ask of a preview: "did it say the same things?". Word order is
//!   left out on purpose: two models that make the same points in another order agree.
//! - It is linear: one pass over each text and a hash map, O(n) time and memory. ROUGE-L
//!   (longest common subsequence) would reward order too, but costs O(n·m): two 4 KiB
//!   answers are ~700 × 700 words, half a million steps before `done` can go out.
//! - Unlike a plain set overlap (Jaccard over distinct words) it counts repetitions, so a
//!   short preview that repeats a few of the final answer's words scores low, as it should.
//! - It is deterministic (the sum does not depend on the hash map's order), symmetric, and
//!   a ratio of integers: the same two texts give the same `f64`, bit for bit, everywhere.
//!
//! Edge cases: two texts without words (both empty, or only punctuation) say the same, 1.0;
//! one without words and one with, 0.0. Each text counts at most [`MAX_WORDS`] words (its
//! beginning): duet does not cap an answer's length, and this bounds what a very long one
//! costs when its run ends.

use std::{borrow::Cow, collections::HashMap};

/// Words read from each text. At about 6 bytes a word this is the first ~100 KiB of an
/// answer, more than a model writes under usual `max_tokens`; past it the rest of a text is
/// not compared (two 4 KiB answers take about 0.1 ms).
pub const MAX_WORDS: usize = 16 * 1024;

/// Bytes read from each text, whatever its words: a word cap alone still scans (and
/// lowercases) a whole text that is one huge word or all punctuation — 16 MB of `É` took
/// 0.6 s of a runtime worker. With both caps the measure stays within a few milliseconds
/// whatever a provider sends.
pub const MAX_BYTES: usize = 128 * 1024;

/// The agreement of two answer texts, in [0, 1]; symmetric, never NaN.
pub fn of(flash: &str, pro: &str) -> f64 {
    // Per word: how often it occurs in each text. The keys borrow from the texts unless a
    // word needs lowercasing. std's hasher (SipHash, randomly keyed) rather than a faster
    // one: the texts are model output a client can steer, and a fixed hash function lets
    // chosen words collide into quadratic time.
    let mut counts: HashMap<Cow<'_, str>, [u32; 2]> = HashMap::new();
    let mut total = 0u64;
    for (side, text) in [flash, pro].into_iter().enumerate() {
        for word in words(head(text)).take(MAX_WORDS) {
            counts.entry(word).or_default()[side] += 1;
            total += 1;
        }
    }
    if total == 0 {
        return 1.0;
    }
    let common: u64 = counts.values().map(|[x, y]| u64::from((*x).min(*y))).sum();
    // Both counts are at most 2 · MAX_WORDS: exact in f64, and the ratio is at most 1.
    (2 * common) as f64 / total as f64
}

/// The first [`MAX_BYTES`] of `text`, cut at a character boundary.
fn head(text: &str) -> &str {
    if text.len() <= MAX_BYTES {
        return text;
    }
    // A UTF-8 character is at most 4 bytes: a boundary is at most 3 bytes back.
    let end = (MAX_BYTES - 3..=MAX_BYTES)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

/// The words of `text`, lowercased.
fn words(text: &str) -> impl Iterator<Item = Cow<'_, str>> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(lowercase)
}

/// `word` lowercased, borrowed when it already is (the usual case in prose).
fn lowercase(word: &str) -> Cow<'_, str> {
    if !word.is_ascii() {
        Cow::Owned(word.to_lowercase())
    } else if word.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(word.to_ascii_lowercase())
    } else {
        Cow::Borrowed(word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_words_agree_fully_whatever_the_case_punctuation_or_spacing() {
        assert_eq!(of("A monad is a monoid.", "a MONAD, is a monoid!"), 1.0);
        assert_eq!(of("  Tea\n\tor coffee?  ", "tea or coffee"), 1.0);
        assert_eq!(of("**Paris**", "Paris."), 1.0);
    }

    #[test]
    fn only_the_first_max_bytes_of_a_text_count() {
        // One huge word (two bytes a character, so the cut falls inside one) is read only up
        // to the cap: its head is the word that counts.
        let huge = "é".repeat(MAX_BYTES);
        assert_eq!(head(&huge).len(), MAX_BYTES);
        let odd = format!("x{huge}");
        assert_eq!(head(&odd).len(), MAX_BYTES - 1);
        assert!(odd.is_char_boundary(head(&odd).len()));
        // Words past the byte cap are not compared (well under the word cap here: 32-byte
        // words): these texts differ only there.
        let filler = "abcdefghijklmnopqrstuvwxyz012345 ".repeat(MAX_BYTES / 33 + 1);
        assert!(filler.split(' ').count() < MAX_WORDS);
        assert_eq!(
            of(&format!("{filler} tea"), &format!("{filler} coffee")),
            1.0
        );
        assert_eq!(head("short"), "short");
    }

    #[test]
    fn no_word_in_common_is_zero() {
        assert_eq!(of("tea please", "coffee instead"), 0.0);
    }

    #[test]
    fn texts_without_words() {
        assert_eq!(of("", ""), 1.0);
        assert_eq!(of("...", "!?"), 1.0);
        assert_eq!(of("", "an answer"), 0.0);
        assert_eq!(of("an answer", ""), 0.0);
        assert_eq!(of("—", "an answer"), 0.0);
    }

    #[test]
    fn counts_repeated_words_and_partial_overlap() {
        // 2·|{a, b}| / (3 + 2): "a" occurs once in the second text.
        assert_eq!(of("a a b", "a b"), 0.8);
        // 2·2 / (4 + 4).
        assert_eq!(of("the cat sat down", "the dog sat up"), 0.5);
        // Order does not matter.
        assert_eq!(of("one two three", "three two one"), 1.0);
    }

    #[test]
    fn unicode_words_are_compared_lowercased() {
        assert_eq!(of("Ünïcödé STRASSE Ελλάδα", "ünïcödé strasse ελλάδα"), 1.0);
        assert_eq!(of("東京 は 首都", "東京 は 首都 です"), 2.0 * 3.0 / 7.0);
        // Digits are word characters; emoji separate words.
        assert_eq!(of("42🙂answers", "42 answers"), 1.0);
    }

    #[test]
    fn symmetric_bounded_and_deterministic() {
        let texts = [
            "",
            "x",
            "The quick brown fox jumps over the lazy dog.",
            "the the the",
            "Der schnelle braune Fuchs — the fox!",
            "🙂🙂",
        ];
        for a in texts {
            for b in texts {
                let v = of(a, b);
                assert!((0.0..=1.0).contains(&v), "{a:?} {b:?}: {v}");
                assert!(!v.is_nan());
                assert_eq!(v.to_bits(), of(b, a).to_bits(), "{a:?} {b:?}");
                assert_eq!(v.to_bits(), of(a, b).to_bits());
            }
        }
    }

    #[test]
    fn words_past_the_cap_are_not_compared() {
        let long_a = format!("{}tail", "w ".repeat(MAX_WORDS));
        let long_b = format!("{}other", "w ".repeat(MAX_WORDS));
        assert_eq!(of(&long_a, &long_b), 1.0);
    }

    /// The cost on the path of `done`. `cargo test --lib agreement -- --ignored --nocapture`
    /// (a debug build is several times slower than a release one).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_of_two_4_kib_answers() {
        let sentence = "The preview said much the same as the final answer, in other words. ";
        let a: String = sentence.repeat(4096 / sentence.len() + 1)[..4096].to_owned();
        let b: String = a.replace("same", "different").replace("words", "terms");
        let rounds = 1000;
        let started = std::time::Instant::now();
        let mut sum = 0.0;
        for _ in 0..rounds {
            sum += of(std::hint::black_box(&a), std::hint::black_box(&b));
        }
        let each = started.elapsed() / rounds;
        println!(
            "agreement of 2 × 4 KiB: {:.1} µs each (value {:.4})",
            each.as_secs_f64() * 1e6,
            sum / f64::from(rounds)
        );
    }
}
