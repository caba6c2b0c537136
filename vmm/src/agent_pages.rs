//! The agent's report of the guest pages that hold its own binary, which the
//! copies of a template may share like the kernel's code (see
//! [`crate::kernel_image`] and the agent's `shared_pages` module).
//!
//! A template boot runs only our kernel and agent, and the report is read
//! when the template is saved, so it is trusted to say where the pages are;
//! it is still parsed as untrusted text, and a wrong report could only
//! confuse the copies' own guests (a shared page that the guest later reuses
//! as a virtio-fs buffer would look empty to virtiofsd), never the host.

use crate::kernel_image::GuestRange;

/// The start of the agent's console line (the agent's `shared_pages::PREFIX`):
/// space-separated `start-end` hexadecimal guest-physical ranges follow.
pub const AGENT_PREFIX: &str = "bulkhead-agent: pages to share:";

const PAGE: u64 = 4096;

/// The page-aligned ranges on the last report line of `console`; malformed
/// ranges are left out.
pub fn parse(console: &str) -> Vec<GuestRange> {
    let Some(line) = console
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(AGENT_PREFIX))
    else {
        return Vec::new();
    };
    line.split_whitespace().filter_map(parse_range).collect()
}

fn parse_range(token: &str) -> Option<GuestRange> {
    let (start, end) = token.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (start < end && start.is_multiple_of(PAGE) && end.is_multiple_of(PAGE)).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_report_line_is_read() {
        let console = "booting\n\
            bulkhead-agent: pages to share: 1000-2000\n\
            bulkhead-agent: pages to share: 3000000-3400000 3500000-3501000\n\
            bulkhead-agent: template ready, save me";
        assert_eq!(
            parse(console),
            vec![(0x300_0000, 0x340_0000), (0x350_0000, 0x350_1000)]
        );
        assert_eq!(parse("no report here"), vec![]);
    }

    #[test]
    fn malformed_or_unaligned_ranges_are_left_out() {
        let console = "bulkhead-agent: pages to share: 1000-3000 x-2000 4000-3000 5001-6000 7000 \
            8000-9000-a000 b000-c00";
        assert_eq!(parse(console), vec![(0x1000, 0x3000)]);
    }
}
