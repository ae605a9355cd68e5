// The V2 API as this page uses it: JSON in and out, the API key sent when one was given, and
// every failure turned into an ApiError whose message a person can act on.

const KEY_STORE = "smartmixed.apiKey"; // sessionStorage: forgotten when the tab closes

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // HTTP status; 0 when the server could not be reached
  }
}

export function savedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function saveKey(key) {
  sessionStorage.setItem(KEY_STORE, key);
}

// What the page says for a failed request; `what` names the request ("model list", a model).
export function explain(error, what) {
  const detail = error.message ? `: ${error.message}` : "";
  switch (true) {
    case error.status === 0:
      return `Cannot reach the server (${what})${detail}`;
    case error.status === 401:
      return savedKey()
        ? `The server refused the API key (401) for the ${what}${detail}`
        : `The server needs an API key (401) for the ${what}`;
    case error.status === 503:
      return `Unavailable (503) for the ${what}${detail}`;
    case error.status >= 400 && error.status < 500:
      return `The server refused the request (${error.status}) for the ${what}${detail}`;
    default:
      return `Server error (${error.status}) for the ${what}${detail}`;
  }
}

// JSON body of a successful answer; ApiError otherwise (the server's {"error": ...} as message).
export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = savedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, e.message);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null; // not JSON (a proxy's error page): the status says enough
  }
  if (!response.ok) {
    const message = payload && typeof payload.error === "string" ? payload.error : response.statusText;
    throw new ApiError(response.status, message);
  }
  return payload;
}

// Server readiness: true, false (503), or an ApiError when it cannot be asked.
export async function serverReady() {
  try {
    await call("GET", "/v2/health/ready");
    return true;
  } catch (e) {
    if (e.status === 503) return false;
    throw e;
  }
}

export const listModels = () => call("POST", "/v2/repository/index");
export const modelMetadata = (name) => call("GET", `/v2/models/${encodeURIComponent(name)}`);

// One row of raw values through V2 infer, sent in the shape the model declares (`dims`, its
// input shape without the batch: [784], or [1, 28, 28] for a model reading images; the values
// flat, row-major); resolves to the chosen output's row.
export async function inferRow(name, values, output, dims) {
  const body = {
    inputs: [{ name: "input", shape: [1, ...dims], datatype: "FP32", data: values }],
    outputs: [{ name: output }],
  };
  const answer = await call("POST", `/v2/models/${encodeURIComponent(name)}/infer`, body);
  const tensor = answer.outputs.find((o) => o.name === output);
  return tensor.data;
}
