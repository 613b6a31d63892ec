// A Java HttpClient through an HTTP proxy: GET each URL given after the proxy's
// host:port and print "<status> <HTTP version> <body>" for each, one line per URL.
// Run as a single-file program: java -Djavax.net.ssl.trustStore=... ProxyGet.java ...
import java.net.InetSocketAddress;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class ProxyGet {
    public static void main(String[] args) throws Exception {
        int colon = args[0].lastIndexOf(':');
        InetSocketAddress proxy = new InetSocketAddress(
            args[0].substring(0, colon), Integer.parseInt(args[0].substring(colon + 1)));
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.of(proxy))
            .connectTimeout(Duration.ofSeconds(20))
            .build();
        for (int i = 1; i < args.length; i++) {
            HttpRequest req = HttpRequest.newBuilder(URI.create(args[i]))
                .timeout(Duration.ofSeconds(20))
                .build();
            HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
            System.out.println(resp.statusCode() + " " + resp.version() + " "
                + resp.body().replace('\n', ' '));
        }
    }
}
