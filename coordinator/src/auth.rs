//! Who may talk to the coordinator. Bound to a loopback address it accepts every local
//! process, like a database on localhost; bound anywhere else it requires a shared token,
//! read from a file or the environment (never a command-line argument, which other users
//! can see, `lvm_proto::load_token`), and rejects requests without it as `unauthenticated`.

use tonic::{Request, Status};

/// Checks the bearer token of every request.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    expected: Option<Vec<u8>>,
}

impl TokenCheck {
    /// Accepts everyone (`None`) or only holders of `token`.
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(given) if same(given.as_bytes(), expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(
                "this coordinator requires a token (worker --token-file or $LVM_SWEEP_TOKEN)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn only_the_right_token_passes() {
        let mut check = TokenCheck::new(Some("s3cret-token-0123456".into()));
        assert!(
            check
                .call(with(Some("Bearer s3cret-token-0123456")))
                .is_ok()
        );
        for bad in [None, Some("Bearer wrong"), Some("s3cret-token-0123456")] {
            let status = check.call(with(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(TokenCheck::new(None).call(with(None)).is_ok());
    }
}
