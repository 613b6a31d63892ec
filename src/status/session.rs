//! Login sessions of the status page, when `admin.token_file` is set: a browser posts the
//! token once to `/login` and gets a cookie holding a random session identifier (never the
//! token), valid for [`SESSION_TTL`] or until it posts `/logout`. Sessions live in a
//! bounded map; expired ones are pruned whenever one is opened. The cookie's name carries
//! the admin listener's port, since browsers keep cookies by host alone: two proxies on one
//! host (or one proxy's two admin addresses) do not overwrite each other's session. Login
//! attempts are limited to [`MAX_ATTEMPTS_PER_MINUTE`] a minute, all clients together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// The start of the cookie's name, which ends with the admin listener's port.
pub const COOKIE: &str = "aml_egress_session";
/// Most login attempts taken in a minute; more get `429` until the minute is out.
pub const MAX_ATTEMPTS_PER_MINUTE: u32 = 20;
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
    /// The start of the current minute of login attempts, and how many it has had.
    failures: Mutex<(Instant, u32)>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            open: Mutex::new((HashMap::new(), 0)),
            random: SystemRandom::new(),
            failures: Mutex::new((Instant::now(), 0)),
        }
    }
}

/// The cookie's name for the admin listener on `port`.
pub fn cookie_name(port: u16) -> String {
    format!("{COOKIE}_{port}")
}

impl Sessions {
    /// Open a session for the admin listener on `port`: the `Set-Cookie` value that
    /// carries it, or `None` if the system's random source failed.
    pub fn open(&self, port: u16) -> Option<String> {
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
            "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            cookie_name(port),
            hex(&id),
            SESSION_TTL.as_secs()
        ))
    }

    /// Whether one of the `Cookie` header values carries an open, unexpired session of
    /// the admin listener on `port`.
    pub fn valid<'a>(&self, cookies: impl IntoIterator<Item = &'a [u8]>, port: u16) -> bool {
        let now = Instant::now();
        let guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        ids(cookies, port).any(|id| guard.0.get(&id).is_some_and(|(until, _)| *until > now))
    }

    /// Close the sessions the `Cookie` header values carry (`/logout`): the `Set-Cookie`
    /// value that removes the cookie from the browser.
    pub fn close<'a>(&self, cookies: impl IntoIterator<Item = &'a [u8]>, port: u16) -> String {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids(cookies, port) {
            guard.0.remove(&id);
        }
        format!(
            "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
            cookie_name(port)
        )
    }

    /// Count a login attempt, before its form is read; `false` once this minute has had
    /// [`MAX_ATTEMPTS_PER_MINUTE`], when the attempt is refused unread. Counting first,
    /// under one lock, keeps attempts sent at once from all passing the check.
    pub fn attempt(&self) -> bool {
        self.attempt_at(Instant::now())
    }

    fn attempt_at(&self, now: Instant) -> bool {
        let mut guard = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(guard.0) >= Duration::from_secs(60) {
            *guard = (now, 0);
        }
        if guard.1 >= MAX_ATTEMPTS_PER_MINUTE {
            return false;
        }
        guard.1 += 1;
        true
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

/// The session identifiers of the admin listener on `port` that `Cookie` values carry.
fn ids<'a>(
    cookies: impl IntoIterator<Item = &'a [u8]>,
    port: u16,
) -> impl Iterator<Item = [u8; 32]> {
    let name = cookie_name(port);
    cookies
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| unhex(v))?
        })
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
        let a = s.open(9464).unwrap();
        let b = s.open(9464).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("aml_egress_session_9464="), "{a}");
        assert!(a.contains("HttpOnly") && a.contains("SameSite=Strict") && a.contains("Path=/"));
        let cookie = format!("other=1; {}", id_of(&a));
        assert!(s.valid([cookie.as_bytes()], 9464));
        // Another admin listener's cookie (another port on the same host) is not this one's.
        assert!(!s.valid([cookie.as_bytes()], 9465));
        assert!(!s.valid([b"aml_egress_session_9464=00".as_slice()], 9464));
        let forged = format!("{COOKIE}_9464={}", "0".repeat(64));
        assert!(!s.valid([forged.as_bytes()], 9464));
        assert!(!s.valid(std::iter::empty(), 9464));
        // Logging out ends the session and removes the cookie.
        let gone = s.close([cookie.as_bytes()], 9464);
        assert!(gone.starts_with("aml_egress_session_9464=;") && gone.contains("Max-Age=0"));
        assert!(!s.valid([cookie.as_bytes()], 9464));
        assert!(s.valid([id_of(&b).as_bytes()], 9464), "only that session");
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.open(1).unwrap();
        for _ in 0..MAX_SESSIONS + 5 {
            s.open(1).unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            !s.valid([id_of(&first).as_bytes()], 1),
            "the oldest went first"
        );
    }

    #[test]
    fn login_attempts_are_limited_per_minute() {
        let s = Sessions::default();
        let now = Instant::now();
        for _ in 0..MAX_ATTEMPTS_PER_MINUTE {
            assert!(s.attempt_at(now));
        }
        assert!(!s.attempt_at(now));
        // A minute later, attempts are taken again, and counted afresh.
        let later = now + Duration::from_secs(61);
        assert!(s.attempt_at(later));
        assert!(s.attempt_at(later));
    }
}
