//! Invariant: an accepted path is a fixed point of canonicalization, carries none of the forms we
//! refuse, and re-parsing what we would forward gives the same path and the same routing decision.
#![no_main]
use flaggate::internals::canonicalize;
use flaggate::internals::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(c) = canonicalize(raw) else { return };
    let s = c.as_str();
    assert!(s.starts_with('/') && !s.contains("//"), "{s:?}");
    assert!(!s.split('/').any(|seg| seg == "." || seg == ".."), "{s:?}");
    let lower = s.to_ascii_lowercase();
    for bad in ["%2e", "%2f", "%5c", "%25", "%00", "%23", "%3b", "\\", ";", "#"] {
        assert!(!lower.contains(bad), "{s:?} contains {bad}");
    }
    assert!(s.bytes().all(|b| (0x21..0x7f).contains(&b)), "{s:?}");
    let again = canonicalize(s).expect("canonical form re-parses");
    assert_eq!(again.as_str(), s);
    // What is forwarded is what was authorized: same bytes, same rule.
    let policy = Policy::default();
    assert_eq!(policy.route(&c).name, policy.route(&again).name);
    let uri: http::Uri = format!("http://upstream{s}").parse().expect("forwardable");
    assert_eq!(uri.path(), s);
});
