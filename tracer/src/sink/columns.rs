//! Table cells measured in terminal columns, not bytes or chars: a CJK name takes two
//! columns a character, an escaped name is longer than the name. A live table cannot know
//! its widths in advance, so a cell that does not fit is cut with "…" (the whole value is in
//! the NDJSON output) and the columns after it never move. `bindtrace who` knows all its
//! rows first and sizes its columns to them instead ([`Columns`]).

use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};

/// Where a value too wide for its cell loses characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Names: the start says the most.
    End,
    /// Addresses: the start (family, prefix) and the end (the port) both matter.
    Middle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Terminal columns `text` takes (escaped text: no control characters are left).
pub(crate) fn width(text: &str) -> usize {
    text.width()
}

/// The longest prefix of `text` that fits in `columns`.
fn head(text: &str, columns: usize) -> &str {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += c.width().unwrap_or(0);
        if used > columns {
            return &text[..at];
        }
    }
    text
}

/// The longest suffix of `text` that fits in `columns`.
fn tail(text: &str, columns: usize) -> &str {
    let mut used = 0;
    for (at, c) in text.char_indices().rev() {
        used += c.width().unwrap_or(0);
        if used > columns {
            return &text[at + c.len_utf8()..];
        }
    }
    text
}

/// Appends `text` in a cell exactly `columns` wide: padded, or cut with "…" where `cut` says.
pub(crate) fn push_cell(out: &mut String, text: &str, columns: usize, align: Align, cut: Cut) {
    let text_width = width(text);
    if text_width > columns {
        let room = columns.saturating_sub(1);
        let (start, end) = match cut {
            Cut::End => (head(text, room), ""),
            Cut::Middle => (head(text, room - room / 2), tail(text, room / 2)),
        };
        out.push_str(start);
        out.push('…');
        out.push_str(end);
        // A wide character that did not fit leaves one column short.
        let used = width(start) + 1 + width(end);
        out.extend(std::iter::repeat_n(' ', columns.saturating_sub(used)));
        return;
    }
    let pad = columns - text_width;
    if align == Align::Right {
        out.extend(std::iter::repeat_n(' ', pad));
        out.push_str(text);
    } else {
        out.push_str(text);
        out.extend(std::iter::repeat_n(' ', pad));
    }
}

/// A table whose columns are as wide as their widest cell (header included); the last column
/// is not padded.
pub(crate) struct Columns<const N: usize> {
    header: [&'static str; N],
    align: [Align; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Columns<N> {
    pub(crate) fn new(header: [&'static str; N], align: [Align; N]) -> Self {
        Self { header, align, rows: Vec::new() }
    }

    /// A row of escaped cells.
    pub(crate) fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self, out: &mut String) {
        let mut widths = self.header.map(width);
        for row in &self.rows {
            for (column, cell) in row.iter().enumerate() {
                widths[column] = widths[column].max(width(cell));
            }
        }
        let header = self.header.map(str::to_owned);
        for row in std::iter::once(&header).chain(&self.rows) {
            for (column, cell) in row.iter().enumerate() {
                if column + 1 == N {
                    out.push_str(cell);
                } else {
                    push_cell(out, cell, widths[column], self.align[column], Cut::End);
                    out.push(' ');
                }
            }
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(text: &str, columns: usize, cut: Cut) -> String {
        let mut out = String::new();
        push_cell(&mut out, text, columns, Align::Left, cut);
        out
    }

    #[test]
    fn cells_are_exactly_as_wide_as_asked() {
        for text in
            ["", "nginx", "名前付きプロセス名前付き", "\\u{1b}]0;x\\u{7}abcdefgh", "[2001:db8:1:2:3:4:5:6]:65535→65535"]
        {
            for columns in [1, 5, 16, 30] {
                for cut in [Cut::End, Cut::Middle] {
                    let out = cell(text, columns, cut);
                    assert_eq!(width(&out), columns, "{text:?} in {columns}: {out:?}");
                }
            }
        }
        let mut right = String::new();
        push_cell(&mut right, "42", 7, Align::Right, Cut::End);
        assert_eq!(right, "     42");
    }

    #[test]
    fn names_lose_their_end_and_addresses_their_middle() {
        assert_eq!(cell("averyveryverylongname", 8, Cut::End), "averyve…");
        assert_eq!(cell("[2001:db8::1:2:3:4:5]:8080", 16, Cut::Middle), "[2001:db…5]:8080");
        assert_eq!(cell("127.0.0.1:80", 16, Cut::Middle), "127.0.0.1:80    ");
        // Two columns a character: 3 of them and the ellipsis fill 7 of 8 columns, padded.
        assert_eq!(cell("名前付きプロセス", 8, Cut::End), "名前付… ");
    }

    #[test]
    fn sized_columns_fit_their_widest_cell() {
        let mut table = Columns::new(["PID", "COMM", "CGROUP"], [Align::Right, Align::Left, Align::Left]);
        table.row(["1".to_owned(), "(no process; timer 60 s)".to_owned(), "-".to_owned()]);
        table.row(["4242".to_owned(), "名前".to_owned(), "/system.slice/x.service".to_owned()]);
        let mut out = String::new();
        table.render(&mut out);
        let lines: Vec<&str> = out.lines().collect();
        let starts: Vec<usize> = lines.iter().map(|l| width(&l[..l.rfind(' ').expect("space") + 1])).collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "the last column starts at one place: {out}");
    }
}
