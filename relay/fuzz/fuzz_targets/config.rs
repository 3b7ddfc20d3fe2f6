//! Fuzzes the config parser and checker (`Config::from_toml`, what `wsrelay check` and every
//! start and reload run): any text must get a verdict, never a panic; every problem names a
//! key and says what is wrong, and points at a line of the file unless it is about something
//! the file leaves out (a missing table or key has no line to point at).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::config::Config;

fuzz_target!(|data: &[u8]| {
    // A config file is text: bytes that are not UTF-8 never reach the parser.
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Err(error) = Config::from_toml(source, "fuzz.toml") else {
        return;
    };
    assert!(!error.problems.is_empty(), "an error without a problem");
    let lines = source.lines().count().max(1);
    for problem in &error.problems {
        assert!(
            !problem.message.trim().is_empty(),
            "{problem:?} says nothing"
        );
        match problem.line {
            Some(line) => assert!(
                (1..=lines + 1).contains(&line),
                "{problem:?}: line {line} of a {lines}-line file"
            ),
            None => assert!(
                ["missing", "needs", "no "]
                    .iter()
                    .any(|absent| problem.message.contains(absent)),
                "{problem:?} has no line and is not about something missing"
            ),
        }
    }
    assert!(error.to_string().contains("fuzz.toml"), "{error}");
});
