//! How walcast's errors read.
//!
//! An error's message says only its own context ("cannot start sink redis", "redis"); its
//! cause is its `source()`, and [`Chain`] prints the whole chain, joined by ": ". The one
//! exception is an error that holds a PostgreSQL error: tokio-postgres's own message says
//! little ("db error"), so such an error prints the server's words itself
//! ([`crate::pg::detail`], with a hint where walcast has one) and ends the chain there; so
//! do the few whose hint belongs after the cause.
//!
//! Logs and the command line print errors with [`Chain`], never with `Display` alone.

use std::fmt;

/// An error and its causes, joined by ": ".
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut next = Some(self.0);
        let mut first = true;
        while let Some(error) = next {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            // tokio-postgres's message hides the server's; its source has it.
            match error.downcast_ref::<tokio_postgres::Error>() {
                Some(postgres) => return f.write_str(&crate::pg::detail(postgres)),
                None => write!(f, "{error}")?,
            }
            next = error.source();
            // An error that holds a PostgreSQL error has printed the server's words already.
            if next.is_some_and(|source| source.is::<tokio_postgres::Error>()) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn a_chain_prints_each_context_once() {
        assert_eq!(Chain(&Outer(Inner)).to_string(), "outer: inner");
        assert_eq!(Chain(&Inner).to_string(), "inner");
    }
}
