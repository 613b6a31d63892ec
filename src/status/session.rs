//! Login sessions of the status page, when `admin.token_file` is set: a browser posts the
//! token once to `/login` and gets a cookie holding a random session identifier (never the
//! token), valid for [`SESSION_TTL`]. Sessions live in a bounded map; expired ones are
//! pruned whenever one is opened.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// The cookie's name.
pub const COOKIE: &str = "aml_egress_session";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; opening one more drops the one closest to expiry.
pub const MAX_SESSIONS: usize = 64;

/// Session identifier to expiry and order of opening (the tie-break among equal
/// expiries), and the number of sessions opened.
type Open = (HashMap<[u8; 32], (Instant, u64)>, u64);

/// The open sessions, by identifier.
pub struct Sessions {
    open: Mutex<Open>,
    random: SystemRandom,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            open: Mutex::new((HashMap::new(), 0)),
            random: SystemRandom::new(),
        }
    }
}

impl Sessions {
    /// Open a session: the `Set-Cookie` value that carries it, or `None` if the system's
    /// random source failed.
    pub fn open(&self) -> Option<String> {
        let mut id = [0u8; 32];
        self.random.fill(&mut id).ok()?;
        let now = Instant::now();
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (open, opened) = &mut *guard;
        open.retain(|_, (until, _)| *until > now);
        while open.len() >= MAX_SESSIONS {
            let Some(soonest) = open.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) else {
                break;
            };
            open.remove(&soonest);
        }
        *opened += 1;
        open.insert(id, (now + SESSION_TTL, *opened));
        Some(format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            hex(&id),
            SESSION_TTL.as_secs()
        ))
    }

    /// Whether one of the `Cookie` header values carries an open, unexpired session.
    pub fn valid<'a>(&self, cookies: impl IntoIterator<Item = &'a [u8]>) -> bool {
        let now = Instant::now();
        let guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        cookies
            .into_iter()
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .filter_map(unhex)
            .any(|id| guard.0.get(&id).is_some_and(|(until, _)| *until > now))
    }

    /// Sessions held now (expired ones included until the next prune).
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// No session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks(2)) {
        let h = (pair[0] as char).to_digit(16)?;
        let l = (pair[1] as char).to_digit(16)?;
        *o = (h * 16 + l) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().trim().to_owned()
    }

    #[test]
    fn a_session_cookie_is_random_flagged_and_recognised() {
        let s = Sessions::default();
        let a = s.open().unwrap();
        let b = s.open().unwrap();
        assert_ne!(a, b);
        assert!(a.contains("HttpOnly") && a.contains("SameSite=Strict") && a.contains("Path=/"));
        let cookie = format!("other=1; {}", id_of(&a));
        assert!(s.valid([cookie.as_bytes()]));
        assert!(!s.valid([b"aml_egress_session=00".as_slice()]));
        let forged = format!("{COOKIE}={}", "0".repeat(64));
        assert!(!s.valid([forged.as_bytes()]));
        assert!(!s.valid(std::iter::empty()));
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.open().unwrap();
        for _ in 0..MAX_SESSIONS + 5 {
            s.open().unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            !s.valid([id_of(&first).as_bytes()]),
            "the oldest went first"
        );
    }
}
