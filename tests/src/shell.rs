//! POSIX shell quoting, for the scripts the harness generates for the guest.
//!
//! The command, environment and working directory of an emulated-host run travel
//! into the guest inside a generated `sh` script; quoting every word keeps spaces,
//! quotes, `$` and newlines in them intact.

/// Quote `word` so that `sh` reads it back as exactly one word with the same bytes.
///
/// Uses single quotes, writing an embedded `'` as `'\''`. Words made only of
/// characters that are never special are left bare, for readable scripts; `=` is
/// not among them, so a quoted word is never taken for a variable assignment.
pub fn quote(word: &str) -> String {
    let is_plain = |c: char| c.is_ascii_alphanumeric() || "-_./,:+@%".contains(c);
    if !word.is_empty() && word.chars().all(is_plain) {
        return word.to_string();
    }
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Quote each word and join them with spaces, giving one shell command line.
pub fn join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(quote("abc/d-e_f.g"), "abc/d-e_f.g");
        assert_eq!(quote("PATH=/bin"), "'PATH=/bin'");
    }

    #[test]
    fn special_words_are_quoted() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn real_shell_reads_words_back() {
        let words = [
            "plain",
            "",
            "with space",
            "it's",
            "\"double\"",
            "$HOME `id` $(id)",
            "line\nbreak",
            "back\\slash",
            "*",
            "ünïcödé",
        ];
        let script = format!("printf '%s\\0' {}", join(&words));
        let out = Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh runs");
        assert!(out.status.success());
        let got: Vec<&str> = std::str::from_utf8(&out.stdout)
            .expect("utf8")
            .split_terminator('\0')
            .collect();
        assert_eq!(got, words);
    }
}
