//! The few command-line flags the local services and tools take: `--flag value` or
//! `--flag=value`, shared so each binary only says which flags it knows.

/// Reads flags one at a time; `value` takes the current flag's value.
pub struct Flags<I: Iterator<Item = String>> {
    args: I,
    inline: Option<String>,
    current: String,
}

impl<I: Iterator<Item = String>> Flags<I> {
    pub fn new(args: I) -> Self {
        Self {
            args,
            inline: None,
            current: String::new(),
        }
    }

    /// The next flag name (`--listen` for both `--listen x` and `--listen=x`).
    pub fn next_flag(&mut self) -> Option<String> {
        let arg = self.args.next()?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        self.inline = inline;
        self.current = name.clone();
        Some(name)
    }

    /// The current flag's value.
    pub fn value(&mut self) -> Result<String, String> {
        self.inline
            .take()
            .or_else(|| self.args.next())
            .ok_or_else(|| format!("{} needs a value", self.current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_and_missing_values() {
        let args = ["--a", "1", "--b=2", "--c"].map(String::from);
        let mut f = Flags::new(args.into_iter());
        assert_eq!(f.next_flag().as_deref(), Some("--a"));
        assert_eq!(f.value(), Ok("1".into()));
        assert_eq!(f.next_flag().as_deref(), Some("--b"));
        assert_eq!(f.value(), Ok("2".into()));
        assert_eq!(f.next_flag().as_deref(), Some("--c"));
        assert_eq!(f.value(), Err("--c needs a value".into()));
        assert_eq!(f.next_flag(), None);
    }
}
