//! Pushes through Web Push, FCM and APNs, with the crate's `PushNotifier`: which providers the
//! flags turn on, and the devices clients register with `push_register`.
//!
//! Devices are kept in memory (`MemoryPushTargets`), so they are lost at a restart and a
//! client registers its device again on every connection. A real server keeps them in its
//! database: implement `offline_queue::push::PushTargets` over it.

#[cfg(feature = "push-core")]
use std::sync::Arc;

use offline_queue::RecipientId;

use super::protocol::{PushDevice, ServerFrame};
use super::{BoxError, Config};

/// The providers turned on, and the devices registered.
pub struct Push {
    #[cfg(feature = "push-core")]
    enabled: Option<Enabled>,
}

#[cfg(feature = "push-core")]
struct Enabled {
    targets: Arc<offline_queue::push::MemoryPushTargets>,
    /// The VAPID public key (base64url) when Web Push is on: a page subscribes with it.
    vapid_public_key: Option<String>,
    fcm: bool,
    apns: bool,
}

/// Whether any `--push-*` flag asks for a provider.
fn wanted(config: &Config) -> bool {
    config.push_web_vapid_key.is_some()
        || config.push_fcm_account.is_some()
        || config.push_apns_key.is_some()
}

fn provider_name(device: &PushDevice) -> &'static str {
    match device {
        PushDevice::WebPush { .. } => "web_push",
        PushDevice::Fcm(_) => "fcm",
        PushDevice::Apns(_) => "apns",
    }
}

fn unavailable(device: &PushDevice) -> ServerFrame {
    ServerFrame::Error {
        id: None,
        code: "push_unavailable",
        message: format!(
            "this server sends no {} pushes (see its --push-* flags)",
            provider_name(device)
        ),
    }
}

#[cfg(not(feature = "push-core"))]
impl Push {
    /// Without the push features, any `--push-*` flag is an error at start.
    pub fn start(config: &Config) -> Result<(Self, Option<PushTask>), BoxError> {
        if wanted(config) {
            return Err("--push-*: built without the push providers (cargo run --features push --example chat_server)".into());
        }
        Ok((Self {}, None))
    }

    pub fn register(&self, _user: &RecipientId, device: PushDevice) -> ServerFrame {
        unavailable(&device)
    }

    pub fn unregister(&self, _user: &RecipientId, device: PushDevice) -> ServerFrame {
        unavailable(&device)
    }

    pub fn vapid_public_key(&self) -> Option<&str> {
        None
    }
}

/// The notifier to chain after the push log, and the task that sends (it ends after the
/// engine is dropped).
pub type PushTask = (
    std::sync::Arc<dyn offline_queue::Notifier>,
    tokio::task::JoinHandle<()>,
);

#[cfg(feature = "push-core")]
impl Push {
    /// The providers the flags turn on, and the notifier sending through them (none without a
    /// `--push-*` flag).
    pub fn start(config: &Config) -> Result<(Self, Option<PushTask>), BoxError> {
        use offline_queue::push::{MemoryPushTargets, PushNotifier, PushOptions, PushProvider};

        if !wanted(config) {
            return Ok((Self { enabled: None }, None));
        }
        let roots = match &config.push_roots {
            Some(path) => Some(
                std::fs::read(path).map_err(|e| format!("--push-roots {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let mut providers: Vec<Arc<dyn PushProvider>> = Vec::new();
        let vapid_public_key = web_push(config, roots.clone(), &mut providers)?;
        let fcm = fcm(config, roots.clone(), &mut providers)?;
        let apns = apns(config, roots, &mut providers)?;
        let targets = Arc::new(MemoryPushTargets::new());
        let (notifier, task) =
            PushNotifier::start(targets.clone(), providers, PushOptions::default())?;
        let task = tokio::spawn(async move {
            if let Ok(metrics) = task.await {
                tracing::info!(?metrics, "push task ended");
            }
        });
        let enabled = Enabled {
            targets,
            vapid_public_key,
            fcm,
            apns,
        };
        Ok((
            Self {
                enabled: Some(enabled),
            },
            Some((Arc::new(notifier), task)),
        ))
    }

    /// Checks `device` and adds it to `user`'s devices.
    pub fn register(&self, user: &RecipientId, device: PushDevice) -> ServerFrame {
        match self.device(device) {
            Ok((provider, device)) => {
                if let Some(enabled) = &self.enabled {
                    enabled.targets.add(user.clone(), device);
                }
                ServerFrame::PushRegistered { provider }
            }
            Err(refusal) => refusal,
        }
    }

    /// Removes `device` from `user`'s devices.
    pub fn unregister(&self, user: &RecipientId, device: PushDevice) -> ServerFrame {
        match self.device(device) {
            Ok((provider, device)) => ServerFrame::PushUnregistered {
                provider,
                removed: self
                    .enabled
                    .as_ref()
                    .is_some_and(|enabled| enabled.targets.remove(user, &device)),
            },
            Err(refusal) => refusal,
        }
    }

    /// The VAPID public key, when Web Push is on.
    pub fn vapid_public_key(&self) -> Option<&str> {
        self.enabled.as_ref()?.vapid_public_key.as_deref()
    }

    /// The crate's device for a registered one, checked, if its provider is on.
    fn device(
        &self,
        device: PushDevice,
    ) -> Result<(&'static str, offline_queue::push::Device), ServerFrame> {
        use offline_queue::push::{Device, PushToken, WebPushSubscription};

        let provider = provider_name(&device);
        let on = self.enabled.as_ref().is_some_and(|enabled| match &device {
            PushDevice::WebPush { .. } => enabled.vapid_public_key.is_some(),
            PushDevice::Fcm(_) => enabled.fcm,
            PushDevice::Apns(_) => enabled.apns,
        });
        if !on {
            return Err(unavailable(&device));
        }
        let checked = match device {
            PushDevice::WebPush {
                endpoint,
                p256dh,
                auth,
            } => WebPushSubscription::new(&endpoint, &p256dh, &auth).map(Device::WebPush),
            PushDevice::Fcm(token) => PushToken::new(&token).map(Device::Fcm),
            PushDevice::Apns(token) => PushToken::new(&token).map(Device::Apns),
        };
        checked
            .map(|device| (provider, device))
            .map_err(|error| ServerFrame::bad_request(None, error.to_string()))
    }
}

/// Web Push, with `--push-web-vapid-key`: its public key, for the page.
#[cfg(feature = "push-core")]
fn web_push(
    config: &Config,
    roots: Option<Vec<u8>>,
    providers: &mut Vec<Arc<dyn offline_queue::push::PushProvider>>,
) -> Result<Option<String>, BoxError> {
    let Some(path) = &config.push_web_vapid_key else {
        return Ok(None);
    };
    #[cfg(feature = "web-push")]
    {
        use offline_queue::push::{VapidKey, WebPush, WebPushOptions};
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--push-web-vapid-key {}: {e}", path.display()))?;
        let key = VapidKey::from_base64url(&text)
            .map_err(|e| format!("--push-web-vapid-key {}: {e}", path.display()))?;
        let public = key.public_key_base64url();
        let subject = config
            .push_web_subject
            .as_deref()
            .ok_or("--push-web-vapid-key needs --push-web-subject (mailto: or https: contact)")?;
        let mut options = WebPushOptions::default();
        options.root_certificates_pem = roots;
        options.allow_plain_http = config.push_allow_http;
        options.allow_any_host = config.push_allow_http;
        providers.push(Arc::new(WebPush::with_options(key, subject, options)?));
        Ok(Some(public))
    }
    #[cfg(not(feature = "web-push"))]
    {
        let _ = (path, roots, providers);
        Err("--push-web-vapid-key: built without the `web-push` feature".into())
    }
}

/// FCM, with `--push-fcm-account`.
#[cfg(feature = "push-core")]
fn fcm(
    config: &Config,
    roots: Option<Vec<u8>>,
    providers: &mut Vec<Arc<dyn offline_queue::push::PushProvider>>,
) -> Result<bool, BoxError> {
    let Some(path) = &config.push_fcm_account else {
        return Ok(false);
    };
    #[cfg(feature = "fcm")]
    {
        use offline_queue::push::{Fcm, FcmOptions, FcmServiceAccount};
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--push-fcm-account {}: {e}", path.display()))?;
        let account = FcmServiceAccount::from_json(&text)
            .map_err(|e| format!("--push-fcm-account {}: {e}", path.display()))?;
        let mut options = FcmOptions::default();
        options.root_certificates_pem = roots;
        options.endpoint = config.push_fcm_endpoint.clone();
        providers.push(Arc::new(Fcm::with_options(account, options)?));
        Ok(true)
    }
    #[cfg(not(feature = "fcm"))]
    {
        let _ = (path, roots, providers);
        Err("--push-fcm-account: built without the `fcm` feature".into())
    }
}

/// APNs, with `--push-apns-key` and its ids.
#[cfg(feature = "push-core")]
fn apns(
    config: &Config,
    roots: Option<Vec<u8>>,
    providers: &mut Vec<Arc<dyn offline_queue::push::PushProvider>>,
) -> Result<bool, BoxError> {
    let Some(path) = &config.push_apns_key else {
        return Ok(false);
    };
    #[cfg(feature = "apns")]
    {
        use offline_queue::push::{Apns, ApnsKey, ApnsOptions};
        let needs = |flag: &Option<String>, name: &str| {
            flag.clone()
                .ok_or_else(|| format!("--push-apns-key needs {name}"))
        };
        let key_id = needs(&config.push_apns_key_id, "--push-apns-key-id")?;
        let team_id = needs(&config.push_apns_team_id, "--push-apns-team-id")?;
        let bundle_id = needs(&config.push_apns_bundle_id, "--push-apns-bundle-id")?;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("--push-apns-key {}: {e}", path.display()))?;
        let key = ApnsKey::from_p8_pem(&pem, &key_id, &team_id)
            .map_err(|e| format!("--push-apns-key {}: {e}", path.display()))?;
        let mut options = ApnsOptions::default();
        options.root_certificates_pem = roots;
        options.endpoint = config.push_apns_endpoint.clone();
        providers.push(Arc::new(Apns::with_options(key, &bundle_id, options)?));
        Ok(true)
    }
    #[cfg(not(feature = "apns"))]
    {
        let _ = (path, roots, providers);
        Err("--push-apns-key: built without the `apns` feature".into())
    }
}
