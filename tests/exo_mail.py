"""Mail as Exchange Online hands it to an outbound connector, for tests and benchmarks.

The synthetic messages elsewhere have five header fields; what Exchange Online sends a connector
(with "Retain internal Exchange email headers", ../shared/reference/exchange-online.md) has some
60 and 12 KB: internal Received hops, ARC and DKIM, the antispam report fields (long, folded),
the cross-tenant and cross-premises fields. Per-field work that is invisible on the former is a
real cost on the latter (issue #14).
"""

from __future__ import annotations


def _b64ish(n: int, seed: int) -> str:
    """``n`` characters that look like the base64 Exchange Online puts in its antispam fields."""
    import base64
    import random

    return base64.b64encode(random.Random(seed).randbytes(n * 3 // 4 + 3)).decode()[:n]


def _folded(name: str, value: str, width: int = 76) -> bytes:
    """One header field, folded as Exchange Online folds its long ones (RFC 5322 §2.2.3)."""
    line, out = f"{name}: ", []
    for i in range(0, len(value), width):
        out.append(line + value[i:i + width])
        line = "\t"
    return ("\r\n".join(out) + "\r\n").encode()


def exchange_online_header(tenant_id: str = "3f6e1b2a-9c4d-4e8f-a1b2-5c7d9e0f1a2b") -> bytes:
    """A header section the size and shape of what Exchange Online hands an outbound connector
    (with "Retain internal Exchange email headers"): six internal Received hops, ARC and DKIM,
    the antispam fields (long, folded), the cross-tenant and organization fields: 58 fields, 12 KB,
    where the synthetic reply has 5. The values are made up. The field names are those the
    reference names (../shared/reference/exchange-online.md) and those Exchange Online adds to
    every message (ARC, antispam report and message data); their sizes and folding are typical of
    its traffic, not copied from a captured message (none is in the public corpora here)."""
    hops = b"".join(
        f"Received: from SN{i}PR11MB{4000 + i}.namprd11.prod.outlook.com (2603:10b6:806:{i:x}::1{i})\r\n"
        f" by SN{i + 1}PR11MB{5000 + i}.namprd11.prod.outlook.com (2603:10b6:806:{i + 1:x}::2{i}) with Microsoft\r\n"
        f" SMTP Server (version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id\r\n"
        f" 15.20.7{i}1.{20 + i}; Mon, 2 Dec 2024 09:1{i}:0{i} +0000\r\n".encode() for i in range(6))
    f = _folded
    x = tenant_id
    return (hops
            + f("ARC-Seal", "i=1; a=rsa-sha256; s=arcselector10001; d=microsoft.com; cv=none; b=" + _b64ish(340, 1))
            + f("ARC-Message-Signature", "i=1; a=rsa-sha256; c=relaxed/relaxed; d=microsoft.com; s=arcselector10001; "
                "h=From:Date:Subject:Message-ID:Content-Type:MIME-Version:X-MS-Exchange-AntiSpam-MessageData-ChunkCount:"
                "X-MS-Exchange-AntiSpam-MessageData-0; bh=" + _b64ish(44, 2) + "; b=" + _b64ish(340, 3))
            + f("ARC-Authentication-Results", "i=1; mx.microsoft.com 1; spf=pass smtp.mailfrom=contoso.com; dmarc=pass "
                "action=none header.from=contoso.com; dkim=pass header.d=contoso.com; arc=none")
            + f("DKIM-Signature", "v=1; a=rsa-sha256; c=relaxed/relaxed; d=contoso.com; s=selector1; h=From:Date:"
                "Subject:Message-ID:Content-Type:MIME-Version:X-MS-Exchange-SenderADCheck; bh=" + _b64ish(44, 4)
                + "; b=" + _b64ish(340, 5))
            + b"From: Alice <alice@contoso.com>\r\nTo: bob@example.net\r\nSubject: RE: plan\r\n"
            + b"Thread-Topic: plan\r\nThread-Index: " + _b64ish(40, 6).encode() + b"==\r\n"
            + b"Date: Mon, 2 Dec 2024 09:10:00 +0000\r\n"
            + b"Message-ID: <SN6PR11MB4000C1A2B3C4D5E6F7A8B9C0D1E2F3A4@SN6PR11MB4000.namprd11.prod.outlook.com>\r\n"
            + b"References: <CAB1C2D3E4F5@mail.example.net>\r\nIn-Reply-To: <CAB1C2D3E4F5@mail.example.net>\r\n"
            + b"Accept-Language: en-US\r\nContent-Language: en-US\r\nX-MS-Has-Attach:\r\nX-MS-TNEF-Correlator:\r\n"
            + f("authentication-results", "dkim=none (message not signed) header.d=none;dmarc=none action=none "
                "header.from=contoso.com;")
            + b"x-ms-publictraffictype: Email\r\nx-ms-traffictypediagnostic: SN6PR11MB4000:EE_|DM4PR11MB5000:EE_\r\n"
            + b"x-ms-office365-filtering-correlation-id: 5b2f6c1e-8d3a-4f7b-9e1c-2a4d6f8b0c1e\r\n"
            + b"x-ms-exchange-senderadcheck: 1\r\nx-ms-exchange-antispam-relay: 0\r\n"
            + f("x-microsoft-antispam", "BCL:0;ARA:13230040|366016|1800799024|376014|38070700018;")
            + f("x-microsoft-antispam-message-info", _b64ish(1800, 7))
            + f("x-forefront-antispam-report", "CIP:255.255.255.255;CTRY:;LANG:en;SCL:1;SRV:;IPV:NLI;SFV:NSPM;H:"
                "SN6PR11MB4000.namprd11.prod.outlook.com;PTR:;CAT:NONE;SFS:(13230040)(366016)(1800799024)"
                "(376014)(38070700018);DIR:OUT;SFP:1101;")
            + b"x-ms-exchange-antispam-messagedata-chunkcount: 1\r\n"
            + f("x-ms-exchange-antispam-messagedata-0", _b64ish(3400, 8))
            + b"MIME-Version: 1.0\r\nX-OriginatorOrg: contoso.com\r\n"
            + b"X-MS-Exchange-CrossTenant-AuthAs: Internal\r\n"
            + b"X-MS-Exchange-CrossTenant-AuthSource: SN6PR11MB4000.namprd11.prod.outlook.com\r\n"
            + b"X-MS-Exchange-CrossTenant-Network-Message-Id: 5b2f6c1e-8d3a-4f7b-9e1c-2a4d6f8b0c1e\r\n"
            + b"X-MS-Exchange-CrossTenant-originalarrivaltime: 02 Dec 2024 09:10:00.1234 (UTC)\r\n"
            + b"X-MS-Exchange-CrossTenant-fromentityheader: Hosted\r\n"
            + f"X-MS-Exchange-CrossTenant-id: {x}\r\n".encode()
            + b"X-MS-Exchange-CrossTenant-mailboxtype: HOSTED\r\n"
            + f("X-MS-Exchange-CrossTenant-userprincipalname", _b64ish(120, 9))
            + b"X-MS-Exchange-Transport-CrossTenantHeadersStamped: DM4PR11MB5000\r\n"
            + b"X-MS-Exchange-CrossPremises-AuthAs: Internal\r\nX-MS-Exchange-CrossPremises-AuthMechanism: 04\r\n"
            + b"X-MS-Exchange-CrossPremises-AuthSource: SN6PR11MB4000.namprd11.prod.outlook.com\r\n"
            + b"X-MS-Exchange-CrossPremises-TransportTrafficType: Email\r\n"
            + b"X-MS-Exchange-CrossPremises-SCL: 1\r\nX-MS-Exchange-CrossPremises-messagesource: StoreDriver\r\n"
            + b"X-MS-Exchange-CrossPremises-BCC:\r\nX-MS-Exchange-CrossPremises-originalclientipaddress: 10.0.0.1\r\n"
            + b"X-MS-Exchange-CrossPremises-transporttraffictype: Email\r\n"
            + f("X-MS-Exchange-CrossPremises-antispam-scancontext", "DIR:Originating;SFV:NSPM;SKIP:0;")
            + b"X-MS-Exchange-CrossPremises-processed-by-journaling: Journal Agent\r\n"
            + b"X-OrganizationHeadersPreserved: DM4PR11MB5000.namprd11.prod.outlook.com\r\n")
