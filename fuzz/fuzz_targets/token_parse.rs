//! Invariant: reading a token from any Authorization value never panics, yields a trimmed non-empty
//! slice of the input, and the label parser agrees with the documented shapes.
#![no_main]
use flaggate::internals::token_from_value;
use flaggate::internals::{parse, Digest, ProjectLabel, Shape};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    if let Some(t) = token_from_value(value) {
        assert!(!t.is_empty());
        assert!(value.contains(t));
        assert_eq!(t.trim_matches([' ', '\t']), t);
        assert_eq!(Digest::of(t), Digest::of(t));
        match parse(t) {
            Shape::Pat => assert!(t.starts_with("user:") && t.len() > 5),
            Shape::Api { projects, environment } => {
                assert!(!environment.is_empty());
                let (label, secret) = t.split_once('.').expect("api tokens have a '.'");
                assert!(!secret.is_empty());
                assert!(label.ends_with(environment));
                if let ProjectLabel::One(p) = projects {
                    assert!(!p.is_empty() && label.starts_with(p));
                }
            }
            Shape::Legacy => {}
        }
    }
});
