//! Whether to colour what goes to a stream.
//!
//! Escape sequences belong on a terminal only: in a pipe, a log file or CI
//! they are noise that breaks `grep`. And a user who sets `NO_COLOR` (any
//! non-empty value, <https://no-color.org>) asked for none anywhere.

use std::io::IsTerminal;

/// True when `stream` is a terminal and `NO_COLOR` is unset or empty.
pub fn enabled(stream: &impl IsTerminal) -> bool {
    enabled_with(stream.is_terminal(), std::env::var_os("NO_COLOR"))
}

fn enabled_with(is_terminal: bool, no_colour: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_colour.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_terminal_without_no_color_gets_colour() {
        assert!(enabled_with(true, None));
        assert!(enabled_with(true, Some("".into())));
        assert!(!enabled_with(true, Some("1".into())));
        assert!(!enabled_with(false, None));
    }

    #[test]
    fn a_file_is_not_a_terminal() {
        let file = tempfile::tempfile().unwrap();
        assert!(!enabled(&file));
    }
}
