//! A `.env` line whose value would lose a `$`. dotenvy (0.15) replaces
//! `$NAME` and `${NAME}` outside single quotes with the variable's value,
//! and with nothing when no variable of that name is set: silently, so a
//! password `Xy$9kQ#zz` was read as `Xy#zz` (and `Xy#zz` got in). dotenvy
//! has no way to see or refuse that substitution, so this follows its
//! parser (its parse module: `parse_line`, `parse_value`; its iterator: a quoted
//! value over several lines is one) to find such a line before it is read.

/// The first line (its number, from 1, and the name it sets) whose value
/// has a `$` that would read as nothing: its name is no variable set in the
/// environment (`in_env`) nor on an earlier line. A line whose name the
/// environment or an earlier line sets already is not used by dotenvy (it
/// keeps the first), and not looked at. `None` too from the first line
/// dotenvy cannot read (it names that line itself).
pub fn dropped_dollar(text: &str, in_env: &dyn Fn(&str) -> bool) -> Option<(usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut earlier: Vec<String> = Vec::new();
    for entry in entries(text) {
        let (at, line) = entry?;
        // dotenvy stops at a line that is not `NAME=value`.
        let Some((name, value)) = parse_line(&line)? else {
            continue;
        };
        let set = |n: &str| in_env(n) || earlier.iter().any(|e| e == n);
        match scan(value, &set) {
            Scan::Drops if !set(name) => return Some((at, name.to_string())),
            Scan::Drops | Scan::Fine => {}
            Scan::Open | Scan::Invalid => return None,
        }
        earlier.push(name.to_string());
    }
    None
}

/// What dotenvy reads as one line (its iterator's `QuotedLines`): a physical
/// line, and the ones after it while a quote is open at its end (by its
/// `eval_end_state`), cut at an unquoted ` #` comment; with the number of
/// its first line. `None` where dotenvy fails (a quote open at the end).
fn entries(text: &str) -> impl Iterator<Item = Option<(usize, String)>> + '_ {
    let mut lines = text.split_inclusive('\n').enumerate();
    std::iter::from_fn(move || loop {
        let (at, first) = lines.next()?;
        if first.trim_start().starts_with('#') {
            continue;
        }
        let mut buf = String::new();
        let mut state = End::Complete;
        let mut chunk = first;
        loop {
            let from = buf.len();
            buf.push_str(chunk);
            let (pos, now) = end_state(state, &buf[from..]);
            state = now;
            match state {
                End::Complete => {
                    let line = buf.trim_end_matches('\n').trim_end_matches('\r');
                    return Some(Some((at + 1, line.to_string())));
                }
                End::Comment => {
                    buf.truncate(from + pos);
                    return Some(Some((at + 1, buf)));
                }
                _ => match lines.next() {
                    Some((_, more)) => chunk = more,
                    None => return Some(None),
                },
            }
        }
    })
}

/// dotenvy's `ParseState`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Escape,
    StrongOpen,
    StrongOpenEscape,
    WeakOpen,
    WeakOpenEscape,
    Comment,
    WhiteSpace,
}

/// dotenvy's `eval_end_state`: the state at the end of `buf`, from `prev`,
/// and where a comment starts.
fn end_state(prev: End, buf: &str) -> (usize, End) {
    let mut state = prev;
    let mut at = 0;
    for (pos, c) in buf.char_indices() {
        at = pos;
        state = match state {
            End::WhiteSpace => match c {
                '#' => return (at, End::Comment),
                '\\' => End::Escape,
                '"' => End::WeakOpen,
                '\'' => End::StrongOpen,
                _ => End::Complete,
            },
            End::Escape => End::Complete,
            End::Complete => match c {
                c if c.is_whitespace() && c != '\n' && c != '\r' => End::WhiteSpace,
                '\\' => End::Escape,
                '"' => End::WeakOpen,
                '\'' => End::StrongOpen,
                _ => End::Complete,
            },
            End::WeakOpen => match c {
                '\\' => End::WeakOpenEscape,
                '"' => End::Complete,
                _ => End::WeakOpen,
            },
            End::WeakOpenEscape => End::WeakOpen,
            End::StrongOpen => match c {
                '\\' => End::StrongOpenEscape,
                '\'' => End::Complete,
                _ => End::StrongOpen,
            },
            End::StrongOpenEscape => End::StrongOpen,
            End::Comment => return (at, End::Comment),
        };
    }
    (at, state)
}

/// A line's name and value, as dotenvy's `parse_line` splits it (`export`
/// before the name allowed; a value that is empty or starts with `#` is
/// empty); `Some(None)` for a blank line or a comment, `None` for a line
/// that is not `NAME=value`.
fn parse_line(line: &str) -> Option<Option<(&str, &str)>> {
    let line = line.trim_end().trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Some(None);
    }
    let key = |l: &str| -> Option<usize> {
        l.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            .then(|| {
                l.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(l.len())
            })
    };
    let end = key(line)?;
    let (mut name, mut rest) = (&line[..end], line[end..].trim_start());
    if name == "export" && !rest.starts_with('=') {
        let end = key(rest)?;
        (name, rest) = (&rest[..end], rest[end..].trim_start());
    }
    let value = rest.strip_prefix('=')?.trim_start();
    Some(Some((
        name,
        if value.starts_with('#') { "" } else { value },
    )))
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Fine,
    /// A substitution of a name that is not set.
    Drops,
    /// A quote or `${` left open.
    Open,
    /// Not a value dotenvy reads (it says so).
    Invalid,
}

/// dotenvy's `parse_value`, keeping only whether a substitution reads a
/// name that is not set. Its rules, kept as they are: a `$` starts a name
/// inside double quotes too; a name is letters and digits (not `_`); the
/// character that ends a bare name is taken as it is (a quote or `\` there
/// opens or escapes nothing); an unquoted space or tab ends the value,
/// and only a `#` comment may follow.
fn scan(value: &str, set: &dyn Fn(&str) -> bool) -> Scan {
    #[derive(PartialEq)]
    enum Name {
        None,
        Bare,
        Braced,
    }
    let (mut strong, mut weak, mut escaped, mut ended) = (false, false, false, false);
    let mut mode = Name::None;
    let mut name = String::new();
    let mut drops = false;
    let mut read = |name: &mut String| {
        drops |= !set(name);
        name.clear();
    };
    for c in value.chars() {
        if ended {
            match c {
                ' ' | '\t' => continue,
                '#' => break,
                _ => return Scan::Invalid,
            }
        } else if escaped {
            if !matches!(c, '\\' | '\'' | '"' | '$' | ' ' | 'n') {
                return Scan::Invalid;
            }
            escaped = false;
        } else if strong {
            strong = c != '\'';
        } else if mode != Name::None {
            if c.is_alphanumeric() {
                name.push(c);
            } else if mode == Name::Braced {
                if c == '}' {
                    mode = Name::None;
                    read(&mut name);
                } else {
                    name.push(c);
                }
            } else if c == '{' && name.is_empty() {
                mode = Name::Braced;
            } else {
                read(&mut name);
                if c != '$' {
                    mode = Name::None;
                }
            }
        } else if c == '$' {
            mode = Name::Bare;
        } else if weak {
            match c {
                '"' => weak = false,
                '\\' => escaped = true,
                _ => {}
            }
        } else {
            match c {
                '\'' => strong = true,
                '"' => weak = true,
                '\\' => escaped = true,
                ' ' | '\t' => ended = true,
                _ => {}
            }
        }
    }
    if mode == Name::Braced || strong || weak {
        return Scan::Open;
    }
    if mode == Name::Bare {
        read(&mut name);
    }
    if drops {
        Scan::Drops
    } else {
        Scan::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::dropped_dollar;

    /// Set in the environment: `SETV`, `INGRESS_BASIC_PASSWORD`.
    fn check(text: &str) -> Option<(usize, String)> {
        dropped_dollar(text, &|n| n == "SETV" || n == "INGRESS_BASIC_PASSWORD")
    }

    fn dropped(text: &str) -> bool {
        check(text).is_some()
    }

    /// Each case as dotenvy 0.15.7 reads it: a `$` read as nothing is
    /// refused, one that reads a set variable, or is literal, is not.
    #[test]
    fn a_dollar_is_refused_where_dotenvy_reads_it_as_nothing() {
        for text in [
            "P=Xy$9kQ#zz",
            "P=\"Xy$9kQ#zz\"",
            "P=Xy9kQzz$",
            "P=Xy${UNSET}zz",
            "P=Xy$SET_HERE",
            "P=$SETV'$zz'",
            "P=$SETV\\$zz",
            "P=\"a\n/$zz/x\"",
            "export\tA=1\nP=$B",
            "\u{feff}P=x$zz",
            "NOTE= # leave empty\nP=Xy$9kQ#zz",
            "NOTE= # set $X here\nP=a$zz",
        ] {
            assert!(dropped(text), "{text:?}");
        }
        for text in [
            "P='Xy$9kQ#zz'",
            "P=Xy\\$9kQ#zz",
            "P=Xy$SETV",
            "A=1\nP=Xy${A}zz",
            "P=ab # a comment with a $",
            "P='a\nq=$zz'",
            "\u{feff}U=1\nP=$U",
            "export\tU=1\nP=$U",
            // The environment sets it: dotenvy does not read this line.
            "INGRESS_BASIC_PASSWORD=Xy$9kQ",
            "NOTE=#$zz",
            // The first of a name written twice is the one used.
            "P=ok\nP=Xy$zz",
            // Not a value dotenvy reads: its own error names the line.
            "P=a b",
            // Not NAME=value: dotenvy stops there, and says so.
            "A=1\nSEG seg\nT=http://h/${SEG}",
            "export SEG\nT=$SEG",
        ] {
            assert!(!dropped(text), "{text:?}");
        }
    }

    #[test]
    fn the_line_is_where_the_value_starts_and_its_name_is_given() {
        assert_eq!(
            check("# c\nA=1\n\nB=\"x\ny\"\nC=p$q"),
            Some((6, "C".to_string()))
        );
        assert_eq!(check("A=\"x\n$q y\"\nB=1"), Some((1, "A".to_string())));
        // A bare name just before the closing quote takes the quote as it
        // is (dotenvy then finds the quote open, and says so itself).
        assert_eq!(check("A=\"x$q\"\nB=1"), None);
    }
}
