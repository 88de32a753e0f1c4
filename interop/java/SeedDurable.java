import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;

/**
 * Seed article, "消息持久化": a durable direct exchange, a durable queue and a message published
 * with MessageProperties.PERSISTENT_TEXT_PLAIN. Checks that the exchange and queue exist as
 * declared (re-declaring them equally succeeds, differently fails with 406), that the message
 * was routed to the queue and comes back persistent and text/plain.
 *
 * Usage: java SeedDurable HOST PORT
 */
public class SeedDurable {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedDurable: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    /** The reply code of the channel error that a call caused, or -1 if it caused none. */
    static int channelErrorCode(IOException e) {
        if (e.getCause() instanceof ShutdownSignalException) {
            Object reason = ((ShutdownSignalException) e.getCause()).getReason();
            if (reason instanceof AMQP.Channel.Close) {
                return ((AMQP.Channel.Close) reason).getReplyCode();
            }
        }
        return -1;
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedDurable", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        long id = System.nanoTime();
        String exchangeName = "seed.durable.x." + id;
        String queueName = "seed.durable.q." + id;
        String routingKey = "order.created";
        String message = "order 42";

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            // 设置 durable = true;
            boolean durable = true;
            boolean exclusive = false;
            channel.exchangeDeclare(exchangeName, "direct", durable);
            channel.queueDeclare(queueName, durable, exclusive, false, null);
            channel.queueBind(queueName, exchangeName, routingKey);

            // 设置 MessageProperties.PERSISTENT_TEXT_PLAIN
            channel.basicPublish(exchangeName, routingKey, MessageProperties.PERSISTENT_TEXT_PLAIN,
                    message.getBytes());

            channel.exchangeDeclarePassive(exchangeName);
            check(true, "the durable exchange exists (passive declare)");
            AMQP.Queue.DeclareOk ok = channel.queueDeclare(queueName, durable, exclusive, false, null);
            check(queueName.equals(ok.getQueue()), "re-declaring the durable queue identically succeeds");
            channel.exchangeDeclare(exchangeName, "direct", durable);
            check(true, "re-declaring the durable exchange identically succeeds");

            // The publish is routed before a later method on the same channel is answered.
            ok = channel.queueDeclarePassive(queueName);
            check(ok.getMessageCount() == 1,
                    "the message was routed to the durable queue (message count " + ok.getMessageCount() + ")");

            // Declaring with other properties must fail: the queue and exchange are durable.
            try (Channel other = connection.createChannel()) {
                other.queueDeclare(queueName, false, exclusive, false, null);
                check(false, "re-declaring the queue as non-durable is refused");
            } catch (IOException e) {
                int code = channelErrorCode(e);
                check(code == 406, "re-declaring the queue as non-durable is refused with 406 (got " + code + ")");
            }
            try (Channel other = connection.createChannel()) {
                other.exchangeDeclare(exchangeName, "direct", false);
                check(false, "re-declaring the exchange as non-durable is refused");
            } catch (IOException e) {
                int code = channelErrorCode(e);
                check(code == 406, "re-declaring the exchange as non-durable is refused with 406 (got " + code + ")");
            }
            check(channel.isOpen(), "the first channel is unaffected by the other channels' errors");

            GetResponse got = channel.basicGet(queueName, false);
            check(got != null, "the message can be consumed from the durable queue");
            check(message.equals(new String(got.getBody(), StandardCharsets.UTF_8)), "it has the published body");
            AMQP.BasicProperties props = got.getProps();
            check(props.getDeliveryMode() != null && props.getDeliveryMode() == 2,
                    "it is persistent (deliveryMode " + props.getDeliveryMode() + ")");
            check("text/plain".equals(props.getContentType()),
                    "it is text/plain (contentType " + props.getContentType() + ")");
            check(exchangeName.equals(got.getEnvelope().getExchange())
                    && routingKey.equals(got.getEnvelope().getRoutingKey()),
                    "its envelope names the exchange and routing key it was published with");
            channel.basicAck(got.getEnvelope().getDeliveryTag(), false);
            check(channel.queueDeclarePassive(queueName).getMessageCount() == 0,
                    "after basicAck the queue is empty");

            channel.queueDelete(queueName);
            channel.exchangeDelete(exchangeName);
        }
        System.out.println("PASS SeedDurable");
        System.exit(0);
    }
}
