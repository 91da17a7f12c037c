//! worker: trains trials with lvm-core. `worker --coordinator URL` pulls trials from a
//! coordinator and reports their epochs and outcomes ([`remote`]); `worker run` trains one
//! trial given on the command line and prints its metrics ([`local`]).

pub mod local;
pub mod remote;
pub mod spool;

/// An error and its causes on one line, `outer: inner: ...`, leaving out a cause whose text
/// the line already ends with (errors that print their source as part of their message).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let inner = std::io::Error::other("disk full");
        let e = anyhow::Error::new(inner)
            .context("step 3 failed: disk full")
            .context("trial 7");
        assert_eq!(super::one_line(&e), "trial 7: step 3 failed: disk full");
        let e = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(super::one_line(&e), "top: middle: root");
    }
}
