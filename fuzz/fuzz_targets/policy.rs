//! The policy file parser (`policy::file::parse`): any text gives a policy or one error
//! located at a line and column inside the text, never a panic.
//!
//! A policy that parses is then asked about a few hosts and requests, so the compiled
//! patterns and globs are exercised too.
#![no_main]

use std::path::Path;

use egress_user::policy::file::{parse, PolicyError};
use libfuzzer_sys::fuzz_target;

const HOSTS: &[&str] = &[
    "example.com",
    "api.example.com",
    "a.b.c.example.com",
    "127.0.0.1",
    "::1",
    "github.com",
    "",
];
const PATHS: &[&str] = &[
    "/",
    "/api/v1/x",
    "/o/r.git/info/refs",
    "/a/../b",
    "/%2e%2e/x",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text, Path::new("fuzz.toml")) {
        Ok(file) => {
            for sandbox in file.sandboxes.values() {
                for host in HOSTS {
                    let _ = sandbox.host_decision(host);
                    for path in PATHS {
                        let _ = sandbox.request_decision(host, &http::Method::GET, path);
                    }
                }
            }
        }
        Err(PolicyError::Invalid(e)) => {
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&e.line),
                "line {} outside the text's {lines} lines: {e}",
                e.line
            );
            let width = text
                .split('\n')
                .nth(e.line - 1)
                .map_or(0, |l| l.chars().count());
            assert!(
                (1..=width + 1).contains(&e.column),
                "column {} outside line {} ({width} characters): {e}",
                e.column,
                e.line
            );
            assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
        }
        Err(e @ PolicyError::Read { .. }) => panic!("parse read a file: {e}"),
    }
});
